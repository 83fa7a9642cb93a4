"""The browser SDK: one script per campaign, rendered from ``js_templates/`` and served by ``bp``.

Three layers, so the interesting parts are testable without Flask:

* :func:`script_config` - pure: a campaign (and the relay settings) to the JSON object the script
  embeds. Everything in it is public: it ships to every visitor.
* :func:`render_sdk` - the campaign's variant of the committed, minified build
  (``js_templates/compiled/``, made by ``scripts/build-sdk``: :mod:`server.sdk_build`) rendered
  with its config, pre-compressed, cached per script config (not per request): a config reload
  that changes nothing reuses the cached build.
* ``bp`` - ``GET /sdk/<cid>.js``, ``GET /sdk/<cid>/pingtree.js`` and each campaign's first-party
  ``sdk.script_path`` (the stable URLs: always the current build), and ``GET /sdk/<cid>/v/<version>.js``
  (one build by its content, for pinned tags; see :mod:`server.sdk_archive`). The first-party paths
  are matched in a ``before_app_request`` hook rather than a catch-all route, so they can be any path
  and never shadow the app's own 404/405 answers. Every script request is counted by version
  (:mod:`server.sdk_versions`, and the ``sdk`` kind on the observer bus for ``/metrics``).

:func:`snippet_tag` is what ``pingtree-relay snippet CID`` prints.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import brotli
import jinja2
import zopfli.gzip
from flask import Blueprint, Response, current_app, request

from .config import CampaignConfig, Config, RelayConfig
from .contexts import current_request
from .fields import CLICK_IDS, SERVER_ONLY_FIELDS, URL_PARAMS
from .paths import JS_TEMPLATES
from .sdk_archive import VERSION_RE, BuildArchive, default_dir
from .sdk_versions import VersionLog

bp = Blueprint("sdk", __name__)

# Short enough for a config change to reach every page within minutes, long enough that a busy
# landing page does not fetch the script on every view.
CACHE_CONTROL = "public, max-age=300"
# A pinned build's URL names its content: it can never change, so caches may keep it for good.
PINNED_CACHE_CONTROL = "public, max-age=31536000, immutable"
UNKNOWN_VERSION_LOG_SECONDS = 60.0  # at most one log line per campaign per process this often

# The one-line pre-load stub: calls made before the script arrives are queued with their resolver
# (the SDK replays them and resolves each Promise once processed).
STUB = (
    "window.pingtree=window.pingtree||function(){var a=arguments;"
    "return new Promise(function(r){(window.pingtree.q=window.pingtree.q||[]).push([a,r])})};"
)

# js_templates/: the SDK's readable source (rendered by the build) and its compiled variants
# (rendered here, per campaign).
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(JS_TEMPLATES)),
    autoescape=False,  # JavaScript, not HTML: the one value that enters goes through |tojson
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# No spaces in the config's JSON: it ships to every visitor. Sorted: the same bytes on every worker.
templates.policies["json.dumps_kwargs"] = {"sort_keys": True, "separators": (",", ":")}


def name_pattern(names: Iterable[str]) -> str:
    """A JavaScript regular expression literal that matches exactly ``names``, written compactly.

    Names alike but for a last digit share a character class (``sub[1-5]``), three or more names
    with the same prefix up to a ``_`` share a group (``utm_(source|medium|...)``); the order is
    the names' own. Fewer bytes in the SDK than the list itself, and gzip agrees. Field names only
    (letters, digits, ``_``), so nothing in a name can mean anything to the regular expression.
    """
    names = list(dict.fromkeys(names))
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"not a field name: {name!r}")
    # sub1 ... sub5 -> sub[1-5] (at the place of the first), when every digit between is there.
    digits: dict[str, list[str]] = {}
    for name in names:
        if name[-1].isdigit():
            digits.setdefault(name[:-1], []).append(name[-1])
    terms: list[str] = []
    for name in names:
        stem, last = name[:-1], name[-1]
        found = sorted(digits.get(stem, []))
        if len(found) < 3 or found != [str(d) for d in range(int(found[0]), int(found[-1]) + 1)]:
            terms.append(name)
        elif last == found[0]:
            terms.append(f"{stem}[{found[0]}-{found[-1]}]")
    # utm_source, utm_medium, ... -> utm_(source|medium|...), at the place of the first.
    groups: dict[str, list[str]] = {}
    for term in terms:
        if "_" in term[1:-1]:
            groups.setdefault(term[: term.index("_") + 1], []).append(term)
    alternatives: list[str] = []
    for term in terms:
        head = term[: term.index("_") + 1] if "_" in term[1:-1] else ""
        if len(groups.get(head, ())) < 3:
            alternatives.append(term)
        elif term == groups[head][0]:
            alternatives.append(f"{head}({'|'.join(t[len(head) :] for t in groups[head])})")
    pattern = f"^({'|'.join(alternatives)})$"
    if not all(re.fullmatch(pattern, name) for name in names):
        raise AssertionError(pattern)
    return f"/{pattern}/"


# Not campaign values: the relay's field lists (server/fields.py), the same in every campaign's
# script (rendered into the build, as regular expressions: name_pattern; server/sdk_build.py hashes
# them with the sources): the landing-URL parameters the SDK keeps, and the fields only the relay
# may set. The parameters in one pattern: the ids first, then the ad click ids, then sub1-5, adv1-5
# and utm_* (tests/test_attribution.py reads the click ids off the script after the ids).
_ID_PARAMS = ("transaction_id", "pid", "clid", "external_clickid")
SDK_URL_PARAMS = (*_ID_PARAMS, *CLICK_IDS, *(p for p in URL_PARAMS if p not in _ID_PARAMS))
SDK_SERVER_ONLY = tuple(sorted(SERVER_ONLY_FIELDS))  # sorted: the same bytes each build
templates.globals["click_ids"] = CLICK_IDS
templates.globals["url_params_pattern"] = name_pattern(SDK_URL_PARAMS)
templates.globals["server_only_pattern"] = name_pattern(SDK_SERVER_ONLY)
COMPILED = "compiled"  # the build's folder in js_templates/
DEBUG_PANEL_FILE = "debug_panel.js"  # in COMPILED: js_templates/debug_panel.js, minified by the build


@dataclass(frozen=True)
class BuiltScript:
    """One campaign's script, ready to serve in every encoding."""

    body: bytes
    gzip: bytes
    br: bytes
    etag: str  # hex digest of body; each encoding's ETag derives from it
    integrity: str  # "sha384-..." for Subresource Integrity

    @property
    def version(self) -> str:
        """The content address of the build in pinned URLs (``/sdk/CID/v/VERSION.js``)."""
        return self.etag[:16]


def script_config(campaign: CampaignConfig, relay: RelayConfig) -> dict[str, Any]:
    """The JSON object embedded in a campaign's script (pure; the key order does not matter).

    Empty and false values are left out (the script reads a missing key as empty), and so is
    ``generate`` when on, the default (the script reads a missing one as true): every byte here
    ships to every visitor.
    """
    sdk = campaign.sdk
    values = {
        "cid": campaign.cid,
        # Empty: post to the origin the script was loaded from (document.currentScript.src).
        "base": relay.public_url,
        "path": sdk.endpoint_path or f"/api/event/{campaign.cid}",
        "cookie": sdk.cookie_name,
        "cookieAttrs": cookie_attributes(campaign),
        "last": sdk.attribution == "last",
        "ptCookie": sdk.pingtree_cookie,
        "extra": [p for p in sdk.extra_params if p not in URL_PARAMS and p not in CLICK_IDS],
        "call": sdk.call_event,
        "selectors": sorted([selector, event] for selector, event in sdk.selectors.items()),
        "consent": sdk.consent,  # the debug panel says "waiting for consent" only where it applies
    }
    kept = {key: value for key, value in values.items() if value != "" and value != [] and value is not False}
    return kept if sdk.generate_transaction_id else {**kept, "generate": False}


def cookie_attributes(campaign: CampaignConfig) -> str:
    """What the script appends to its attribution cookie (``;Secure`` too, on https pages).

    Written out here rather than by the script: fewer bytes to every visitor than the code that would
    build it. ``cookie_domain`` is checked by the config (a domain name: no ``;`` can get in).
    """
    sdk = campaign.sdk
    domain = f";Domain={sdk.cookie_domain}" if sdk.cookie_domain else ""
    return f";Max-Age={sdk.cookie_days * 86400};Path=/;SameSite=Lax{domain}"


def script_features(campaign: CampaignConfig) -> dict[str, bool]:
    """Which optional parts of the script this campaign needs (the rest is left out of it)."""
    sdk = campaign.sdk
    return {
        "consent": sdk.consent,
        "fill": sdk.fill_forms or sdk.add_hidden_fields,  # the inputs it adds are filled like any
        "hidden": sdk.add_hidden_fields,
        "call": bool(sdk.call_event),
        "selectors": bool(sdk.selectors),
    }


def render_sdk(campaign: CampaignConfig, relay: RelayConfig, *, debug: bool = False) -> BuiltScript:
    """The campaign's script; built once per distinct script config, then served from the cache.

    ``debug=True``: its debug build (``DEBUG_FLAG``), the same script keeping a trail for the debug
    panel, which the normal one loads in its place under ``?pt_debug=1`` (``debug_path``).
    """
    return _build(
        json.dumps(script_config(campaign, relay), sort_keys=True),
        json.dumps(build_flags(campaign, debug=debug), sort_keys=True),
    )


def build_flags(campaign: CampaignConfig, *, debug: bool = False) -> dict[str, bool]:
    """The build flags of the campaign's script: its features, and whether it is the debug build."""
    return {**script_features(campaign), DEBUG_FLAG: debug}


# The build flag of the debug builds: not a campaign's feature (script_features), every campaign's
# script has one. Visitors get the build without it, so the debug code costs them no byte.
DEBUG_FLAG = "debug"


def variant_name(features: Mapping[str, bool]) -> str:
    """The compiled variant's file for a feature set: ``sdk.call.fill.js.j2``, ``sdk.js.j2`` for none."""
    return ".".join(["sdk", *sorted(flag for flag, on in features.items() if on), "js.j2"])


@lru_cache(maxsize=512)
def _build(config_json: str, features_json: str) -> BuiltScript:
    # Keyed by canonical JSON: campaign objects hold dicts (unhashable), and only what reaches the
    # script may decide whether the script changes.
    variant = templates.get_template(f"{COMPILED}/{variant_name(json.loads(features_json))}")
    return package(variant.render(cfg=json.loads(config_json)).encode("utf-8"))


@lru_cache(maxsize=128)
def package(body: bytes) -> BuiltScript:
    """A script body in every encoding, with its ETag and SRI hash (also for builds read back from
    the archive)."""
    return BuiltScript(
        body=body,
        # zopfli: a gzip stream about 2% smaller than zlib's best, once per build (about 20 ms); its
        # header's mtime is 0, so every worker makes the same bytes.
        gzip=zopfli.gzip.compress(body, numiterations=15),
        br=brotli.compress(body, quality=11),
        etag=hashlib.sha256(body).hexdigest()[:32],
        integrity="sha384-" + base64.b64encode(hashlib.sha384(body).digest()).decode("ascii"),
    )


# How the pasted tag loads the script: `defer` downloads it without holding the page up, like
# `async`, but runs it once the page is parsed, after every plain (not async) <script> of the page.
# So where Pingtree's click script is such a tag, it has set its transaction-id cookie before the
# SDK looks for one, wherever the marketer pasted ours; with `async` the SDK could run first, make
# an id up, and the landing page's events would go with one Pingtree never heard of
# (docs/js-api.md, Transaction id). Calls made meanwhile wait in the stub's queue.
TAG_LOADING = "defer"


def snippet_tag(
    config: Config, cid: str, base_url: str | None = None, *, stub: bool = True, integrity: bool = False
) -> str:
    """The HTML to paste in a page's ``<head>``: the pre-load stub and the script tag.

    Default: the stable URL without ``integrity``. It keeps working across every config change and
    upgrade (the page picks up the new build within ``CACHE_CONTROL``'s max-age). ``integrity=True``
    pins today's build: its content-addressed URL with SRI, servable for ``RETENTION_DAYS`` after a
    change supersedes it (the caller keeps the build: :func:`pin`). ``base_url`` defaults to
    ``relay.public_url``. Raises ``KeyError`` for an unknown campaign, ``ValueError`` without a base.
    """
    campaign = config.campaigns[cid]
    base = (base_url or config.relay.public_url).rstrip("/")
    if not base:
        raise ValueError("no base URL: pass one or set relay.public_url")
    if integrity:
        built = render_sdk(campaign, config.relay)
        # A pinned build is always on /sdk/: a first-party script_path names the current build only.
        tag = (
            f'<script {TAG_LOADING} src="{html.escape(base + pinned_path(cid, built.version))}" '
            f'integrity="{built.integrity}" crossorigin="anonymous"></script>'
        )
    else:
        path = campaign.sdk.script_path or f"/sdk/{cid}.js"
        tag = f'<script {TAG_LOADING} src="{html.escape(base + path)}"></script>'
    return f"<script>{STUB}</script>\n{tag}" if stub else tag


def debug_path(cid: str) -> str:
    """Where the normal build loads the debug build from, on the relay's origin (sdk.js.j2)."""
    return f"/sdk/{cid}/debug.js"


def pinned_path(cid: str, version: str) -> str:
    return f"/sdk/{cid}/v/{version}.js"


def pin(config: Config, cid: str) -> None:
    """Keep the campaign's current build in the archive, so a pinned tag printed now stays servable."""
    built = render_sdk(config.campaigns[cid], config.relay)
    BuildArchive(default_dir(config)).remember(cid, built.version, built.body)


def csp_sources(config: Config, cid: str, base_url: str | None = None) -> dict[str, list[str]]:
    """What a page's Content-Security-Policy must allow for the tag ``snippet_tag`` prints.

    For hosts that cannot serve a file of the merchant's own (Webflow): the inline stub is allowed
    by its hash, the script (and the debug panel) by the relay's origin, the events by the origin
    they are posted to. Without the stub (``snippet --no-stub``) the hash is not needed.
    """
    if cid not in config.campaigns:
        raise KeyError(cid)  # like snippet_tag; every campaign needs the same sources
    base = (base_url or config.relay.public_url).rstrip("/")
    if not base:
        raise ValueError("no base URL: pass one or set relay.public_url")
    relay = _origin(base)
    # The SDK posts to relay.public_url when set, else to where it was loaded from (script_config).
    endpoint = _origin(config.relay.public_url) if config.relay.public_url else relay
    stub_hash = (
        "'sha256-" + base64.b64encode(hashlib.sha256(STUB.encode("utf-8")).digest()).decode("ascii") + "'"
    )
    return {"script-src": [stub_hash, relay], "connect-src": sorted({relay, endpoint})}


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


# --- HTTP ---------------------------------------------------------------------------------------------

# Outside /sdk/<cid>.js's namespace: a campaign id has no dot, so no campaign can shadow it.
DEBUG_PANEL_PATH = "/sdk/pingtree.debug.js"


class SdkState:
    """Per app: the archive of builds and the log of versions seen."""

    def __init__(self, config: Config | None) -> None:
        directory = default_dir(config) if config is not None else None
        self.archive = BuildArchive(directory) if directory is not None else None
        self.versions = VersionLog(directory)
        self._unknown_logged: dict[str, float] = {}
        self._unknown_since: dict[str, int] = {}
        if config is not None and self.archive is not None:
            self.archive.prune()
            for campaign in config.campaigns.values():
                built = render_sdk(campaign, config.relay)
                self.archive.remember(campaign.cid, built.version, built.body)

    def unknown_version(self, cid: str, version: str) -> None:
        """A warning line per campaign at most every minute, with how many requests it stands for."""
        now = time.monotonic()
        self._unknown_since[cid] = self._unknown_since.get(cid, 0) + 1
        if now - self._unknown_logged.get(cid, -UNKNOWN_VERSION_LOG_SECONDS) < UNKNOWN_VERSION_LOG_SECONDS:
            return
        self._unknown_logged[cid] = now
        count, self._unknown_since[cid] = self._unknown_since[cid], 0
        from .logs import decision_logger

        decision_logger().warning(
            "sdk_version_unknown",
            extra={
                "fields": {
                    "cid": cid,
                    "version": version if VERSION_RE.match(version) else "invalid",
                    "requests": count,
                    "hint": f"a page loads a pinned tag whose build is unknown or expired; replace it with "
                    f"the tag from: pingtree-relay snippet {cid}",
                }
            },
        )


_state_lock = threading.Lock()


def _state() -> SdkState:
    # Built at the first script request rather than at registration: the relay (its config) is
    # attached to the app by then, and a process that never serves a script writes nothing.
    state = current_app.extensions.get("sdk")
    if state is None:
        with _state_lock:
            state = current_app.extensions.get("sdk")
            if state is None:
                state = current_app.extensions["sdk"] = SdkState(_config())
    return state  # type: ignore[no-any-return]


def versions_seen() -> dict[str, list[dict[str, Any]]]:
    """For the dashboard: per campaign, the script versions pages loaded (latest first)."""
    return _state().versions.recent()


def _config() -> Config | None:
    relay = current_app.extensions.get("relay")
    return getattr(relay, "config", None)


def _campaign(cid: str) -> tuple[Config, CampaignConfig] | None:
    """The relay's config and the campaign ``cid``, or None when either is unknown."""
    config = _config()
    campaign = config.campaigns.get(cid) if config else None
    return None if config is None or campaign is None else (config, campaign)


def _count(cid: str, version: str, state: str) -> None:
    _state().versions.seen(cid, version, state)
    observers = getattr(current_app.extensions.get("relay"), "observers", None)
    if observers is not None:
        observers.emit("sdk", cid=cid, version=version, state=state)


@bp.get("/sdk/<cid>.js")
@bp.get("/sdk/<cid>/pingtree.js")
def script(cid: str) -> Response:
    """A campaign's SDK; 404 with a JavaScript comment for an unknown campaign."""
    found = _campaign(cid)
    if found is None:
        return _not_found()
    config, campaign = found
    return _current(campaign, config)


@bp.get(debug_path("<cid>"))
def debug_script(cid: str) -> Response:
    """The campaign's current debug build (``?pt_debug=1``); also for a page with a pinned tag."""
    found = _campaign(cid)
    if found is None:
        return _not_found()
    config, campaign = found
    built = render_sdk(campaign, config.relay, debug=True)
    _count(cid, built.version, "debug")
    return _script_response(built)


@bp.get("/sdk/<cid>/v/<version>.js")
def pinned_script(cid: str, version: str) -> Response:
    """One build by its content address: current, superseded (from the archive) or unknown."""
    found = _campaign(cid)
    if found is None:
        return _not_found()
    config, campaign = found
    current = render_sdk(campaign, config.relay)
    state = _state()
    if version == current.version:
        _remember(state, cid, current)
        _count(cid, version, "current")
        return _script_response(current, PINNED_CACHE_CONTROL)
    body = state.archive.get(cid, version) if state.archive is not None else None
    if body is not None:
        _count(cid, version, "superseded")
        return _script_response(package(body), PINNED_CACHE_CONTROL)
    _count(cid, "unknown", "unknown")
    state.unknown_version(cid, version)
    # Under SRI nothing but the old bytes can run, so the page's console shows the integrity error;
    # a page without integrity gets the current build, working, with a console warning.
    response = _script_response(_with_warning(current, cid), "no-store")
    response.headers["X-Pingtree-Relay-Sdk"] = "unknown-version"
    return response


@bp.before_app_request
def first_party_script() -> Response | None:
    """Serve the SDK at a campaign's ``sdk.script_path`` (a path that ad blockers do not know)."""
    req = current_request()
    if req.method not in ("GET", "HEAD"):
        return None
    config = _config()
    if config is None:
        return None
    for campaign in config.campaigns.values():
        if campaign.sdk.script_path and campaign.sdk.script_path == req.path:
            return _current(campaign, config)
    return None


def _current(campaign: CampaignConfig, config: Config) -> Response:
    built = render_sdk(campaign, config.relay)
    _remember(_state(), campaign.cid, built)
    _count(campaign.cid, built.version, "stable")
    return _script_response(built)


def _remember(state: SdkState, cid: str, built: BuiltScript) -> None:
    if state.archive is not None:
        state.archive.remember(cid, built.version, built.body)


@lru_cache(maxsize=64)
def _with_warning(current: BuiltScript, cid: str) -> BuiltScript:
    warning = (
        "console.warn("
        + json.dumps(
            f"[pingtree] this page's pinned SDK build is unknown or expired; it gets the current one "
            f"(an integrity attribute blocks it). Replace the tag: pingtree-relay snippet {cid}"
        )
        + ");"
    )
    return package(warning.encode("utf-8") + current.body)


def _script_response(built: BuiltScript, cache_control: str = CACHE_CONTROL) -> Response:
    encoding = _pick_encoding()
    etag = built.etag + ("" if encoding == "identity" else "-" + encoding)
    # A strong ETag belongs to one representation, hence one per encoding; any of them still
    # names the current version, so each is a hit whatever the client now accepts.
    variants = [built.etag, built.etag + "-gzip", built.etag + "-br"]
    if any(request.if_none_match.contains(v) for v in variants) or request.if_none_match.star_tag:
        response = Response(status=304)
    else:
        body = {"identity": built.body, "gzip": built.gzip, "br": built.br}[encoding]
        response = Response(body, mimetype="application/javascript")
        response.headers["Content-Type"] = "application/javascript; charset=utf-8"
        if encoding != "identity":
            response.headers["Content-Encoding"] = encoding
    response.set_etag(etag)
    response.headers["Cache-Control"] = cache_control
    response.headers["Vary"] = "Accept-Encoding"
    _public_headers(response)
    return response


def _pick_encoding() -> str:
    """br or gzip when the client accepts it (q > 0), else the plain bytes."""
    accepted = request.accept_encodings
    best = accepted.best_match(["br", "gzip"])
    return best if best and accepted[best] > 0 else "identity"


def _public_headers(response: Response) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Any site may load the script, with crossorigin="anonymous" for SRI; no credentials involved.
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"


def _not_found() -> Response:
    # A JavaScript comment: a page with a wrong cid gets a 404 in its console, not a syntax error.
    response = Response("/* pingtree-relay: unknown campaign */\n", status=404)
    response.headers["Content-Type"] = "application/javascript; charset=utf-8"
    response.headers["Cache-Control"] = "no-store"
    _public_headers(response)
    return response


# --- the debug panel: a separate script, loaded by the SDK in debug mode only ------------------------


@lru_cache(maxsize=1)
def debug_panel_script() -> BuiltScript:
    """js_templates/debug_panel.js as the build minified it: the same for every campaign (it reads the
    SDK's trail)."""
    return package(
        (JS_TEMPLATES / COMPILED / DEBUG_PANEL_FILE).read_text(encoding="utf-8").rstrip("\n").encode("utf-8")
    )


@bp.get(DEBUG_PANEL_PATH)
def debug_panel() -> Response:
    """The ``?pt_debug=1`` panel. Loaded with ``import()``: a module, fetched with CORS (hence ACAO *)."""
    return _script_response(debug_panel_script())
