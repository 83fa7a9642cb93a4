"""Configuration: one TOML file describes the relay, its campaigns and the sandbox's campaigns.

Loading is strict: every key is checked, and an error names the key path that is wrong
(``campaigns.cmp_1.events.sale.conversion: expected true or false``) so that
``pingtree-relay check-config`` can point an operator straight at the line to fix.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .fields import ATTRIBUTION_FIELDS, CLICK_IDS, COST_OPERATIONS, ID_PATTERN, TIMEZONES
from .fields import (
    SERVER_ONLY_FIELDS as SERVER_ONLY_FIELDS,  # re-exported: config's readers long found it here
)

_ID_RE = re.compile(ID_PATTERN)
_ORIGIN_RE = re.compile(r"^https?://(\*\.)?[A-Za-z0-9\-.]+(:\d{1,5})?$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_\-/.]*$")
# The relay's own routes: a campaign's first-party endpoint_path must not shadow (or be shadowed by)
# any of them, or one campaign's config could take over another surface of the relay.
RESERVED_PATHS: tuple[str, ...] = (
    "/api",
    "/sdk",
    "/admin",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/_sandbox",
    "/sandbox",
    "/demo",
    "/static",
    "/postback",
)


class ConfigError(ValueError):
    """A configuration value is wrong; ``path`` names the key, e.g. ``relay.upstream_url``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class EventConfig:
    """One event a campaign accepts (Pingtree's campaign event settings)."""

    name: str
    conversion: bool = False
    allow_duplicates: bool = False  # Pingtree's isDuplicate ("Multi-Trigger")
    revenue: str | float = "client"  # "client", "signed", or a fixed amount set by the server
    max_revenue: float | None = None
    # Whether the accept path waits for Pingtree's answer while the caller waits (an inline attempt),
    # so the answer carries Pingtree's own (its conversion_id); None: conversions only.
    inline: bool | None = None

    @property
    def tried_inline(self) -> bool:
        """Whether an accepted event of this kind is tried inline when the relay has capacity to
        spare (docs/durability.md): ``inline`` if set, else for conversions, whose answer carries
        the conversion_id a page or a caller waits for."""
        return self.conversion if self.inline is None else self.inline


@dataclass(frozen=True)
class SdkConfig:
    """What the browser SDK of one campaign does; everything here is public (it ships in the script)."""

    cookie_name: str = "pt_attr"
    cookie_days: int = 30
    cookie_domain: str = ""
    attribution: str = "first"  # "first" touch wins, or "last"
    pingtree_cookie: str = "pt_transaction_id"  # Pingtree click script's cookie (name undocumented)
    generate_transaction_id: bool = True
    extra_params: tuple[str, ...] = ()
    call_event: str = ""  # event fired by clicks on tel: links
    selectors: Mapping[str, str] = field(default_factory=dict)  # CSS selector -> event_id
    consent: bool = False  # hold events until the page grants consent
    fill_forms: bool = True
    add_hidden_fields: bool = False  # add the hidden inputs fill_forms fills to every form that lacks them
    script_path: str = ""  # first-party path that also serves the SDK (ad-blocker friendly)
    endpoint_path: str = ""  # first-party path the SDK posts to instead of /api/event/{cid}


@dataclass(frozen=True)
class PostbackConfig:
    """One server-to-server source of conversions (a call-tracking platform, a buyer): its URL is
    ``/postback/{cid}/{name}``, its credential ``token``. See docs/postbacks.md."""

    name: str
    token: str
    event: str = ""  # the event it fires, or ...
    event_param: str = ""  # ... the parameter that names it
    min_duration: float | None = None  # seconds; shorter calls are not conversions
    duration_param: str = ""
    call_id_param: str = ""  # the platform's id of one call: two calls are two conversions
    amount_format: str = "strict"  # "lenient": read "$1,234.50" as 1234.50
    params: Mapping[str, str] = field(default_factory=dict)  # platform's name -> Pingtree's name
    ignore_params: tuple[str, ...] = ()  # sent by the platform, not forwarded
    global_org_id: str = ""  # forward to Pingtree's POST /api/event/global/{org-id} instead


@dataclass(frozen=True)
class CampaignConfig:
    """One campaign: who may post, what it accepts, what the server adds."""

    cid: str
    allowed_origins: tuple[str, ...] = ()
    conversion_timezone: str = "EST"
    server_fields: Mapping[str, Any] = field(default_factory=dict)
    events: Mapping[str, EventConfig] = field(default_factory=dict)
    inactive_sources: frozenset[str] = frozenset()
    extra_fields: tuple[str, ...] = ()
    unknown_fields: str = "reject"  # or "drop"
    allow_server_calls: bool = False  # requests without Origin, with server_key
    server_key: str = ""
    secret: str = ""  # HMAC key for signed revenue
    bot_filter: bool = False
    # The first of these an event carries becomes Pingtree's external_clickid (unless it has one).
    external_clickid_from: tuple[str, ...] = CLICK_IDS
    # Origins allowed like allowed_origins, whose events are test traffic: never sent to Pingtree.
    staging_origins: tuple[str, ...] = ()
    sdk: SdkConfig = field(default_factory=SdkConfig)
    postbacks: Mapping[str, PostbackConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class RateLimits:
    per_ip: str = "120/minute"
    per_campaign: str = "60000/minute"


@dataclass(frozen=True)
class RelayConfig:
    upstream_url: str
    store: str = "sqlite:///pingtree-relay.sqlite3"
    public_url: str = ""
    inline_timeout: float = 0.8
    upstream_timeout: float = 10.0
    max_age_hours: float = 72.0
    lease_seconds: float = 30.0
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 300.0
    # Requests in flight to Pingtree per box (delivery engine + inline attempts): throughput is at
    # most max_in_flight / Pingtree's latency (400 at 300 ms: 1,333 events/s).
    max_in_flight: int = 400
    inline_concurrency: int = 4  # per worker: half its threads at most wait on a slow Pingtree
    trusted_proxy_hops: int = 0
    max_body_bytes: int = 16384
    admin_token: str = ""
    secret_key: str = ""
    access_log: bool = False  # one JSON line per request, besides the decision lines
    # Decision lines per second per process and level, the rest counted in a summary line (server/logs.py).
    decision_log_limit: int = 50
    # Where events from a campaign's staging_origins go; empty: nowhere (answered as the sandbox would).
    staging_upstream_url: str = ""
    # Where superseded SDK builds are kept for pinned (--integrity) tags; "" = beside the SQLite
    # store, or beside the config file with a Redis store (see server/sdk_archive.py).
    sdk_archive_dir: str = ""
    rate_limits: RateLimits = field(default_factory=RateLimits)


@dataclass(frozen=True)
class Config:
    relay: RelayConfig
    campaigns: Mapping[str, CampaignConfig]
    source: str = "<memory>"
    # Risky but allowed values, each "key.path: why" (see server/config_risks.py): check-config
    # prints them, serve logs them at start.
    warnings: tuple[str, ...] = ()


# --- a tiny checker: each function takes (path, value) and returns the clean value ---------------

Check = Callable[[str, Any], Any]


def _bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(path, "expected true or false")
    return v


def _str(path: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(path, "expected a string")
    return v


def _number(path: str, v: Any, *, minimum: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(path, "expected a number")
    if v < minimum:
        raise ConfigError(path, f"expected a number >= {minimum:g}")
    return float(v)


def _int(path: str, v: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(path, "expected a whole number")
    if v < minimum:
        raise ConfigError(path, f"expected a whole number >= {minimum}")
    if maximum is not None and v > maximum:
        raise ConfigError(path, f"expected a whole number <= {maximum}")
    return v


def _choice(*options: str) -> Check:
    def check(path: str, v: Any) -> str:
        if v not in options:
            raise ConfigError(path, "expected one of " + ", ".join(options))
        return v

    return check


def _str_list(item: Check = _str) -> Check:
    def check(path: str, v: Any) -> tuple:
        if not isinstance(v, list):
            raise ConfigError(path, "expected a list of strings")
        return tuple(item(f"{path}[{i}]", x) for i, x in enumerate(v))

    return check


def _table(path: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(path, "expected a table")
    return v


def _fields(path: str, raw: Any, schema: Mapping[str, Check]) -> dict[str, Any]:
    """Check every key of ``raw`` against ``schema``; unknown keys are errors (typos must not pass)."""
    raw = _table(path, raw)
    out = {}
    for key, value in raw.items():
        if key not in schema:
            raise ConfigError(f"{path}.{key}".lstrip("."), _unknown_key(key, schema))
        out[key] = schema[key](f"{path}.{key}", value)
    return out


def _unknown_key(key: str, schema: Mapping[str, Check]) -> str:
    """``unknown key``, with the nearest valid key when one is close: typos are the usual cause."""
    nearest = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
    if nearest:
        return f"unknown key; did you mean `{nearest[0]}`?"
    return "unknown key; expected one of " + ", ".join(sorted(schema))


def _identifier(path: str, v: Any) -> str:
    if not isinstance(v, str) or not _ID_RE.match(v):
        raise ConfigError(path, "expected an identifier of letters, digits, '_' or '-' (at most 64)")
    return v


_DOMAIN_RE = re.compile(
    r"^\.?(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
)


def _cookie_domain(path: str, v: Any) -> str:
    """A host name like example.com (or .example.com): it is written into document.cookie, so
    nothing that could add cookie attributes (';', '=', spaces) may pass."""
    if not isinstance(v, str) or (v and not _DOMAIN_RE.match(v)):
        raise ConfigError(path, "expected a domain like example.com (lower case, no scheme, no port)")
    return v


def _origin(path: str, v: Any) -> str:
    if not isinstance(v, str) or not _ORIGIN_RE.match(v):
        raise ConfigError(path, "expected an origin like https://www.example.com or https://*.example.com")
    return v.lower()


def _url(path: str, v: Any) -> str:
    if not isinstance(v, str) or not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", v):
        raise ConfigError(path, "expected an http(s) URL without query or fragment")
    return v.rstrip("/")


def _first_party_path(path: str, v: Any) -> str:
    if not isinstance(v, str) or (v and not _PATH_RE.match(v)) or "//" in v or ".." in v:
        raise ConfigError(path, "expected an absolute path like /p/x.js")
    return v


def _timezone(path: str, v: Any) -> str:
    if v not in TIMEZONES:
        raise ConfigError(path, "unknown timezone; expected one of " + ", ".join(TIMEZONES))
    return v


def _rate(path: str, v: Any) -> str:
    v = _str(path, v)
    if v and not re.match(r"^\s*\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?\s*$", v):
        raise ConfigError(path, 'expected a rate like "120/minute", or "" for no limit')
    return v.strip()


def _revenue(path: str, v: Any) -> str | float:
    if v in ("client", "signed"):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _number(path, v)
    raise ConfigError(path, 'expected "client", "signed" or a fixed amount')


def _scalar_map(path: str, v: Any) -> dict[str, Any]:
    v = _table(path, v)
    for key, value in v.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}.{key}", "expected a string or a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}.{key}", "expected a finite number")
    if "cost_operation" in v and v["cost_operation"] not in COST_OPERATIONS:
        raise ConfigError(f"{path}.cost_operation", "expected one of " + ", ".join(COST_OPERATIONS))
    return dict(v)


def _event(path: str, name: str, raw: Any) -> EventConfig:
    _identifier(path, name)
    values = _fields(
        path,
        raw,
        {
            "conversion": _bool,
            "allow_duplicates": _bool,
            "revenue": _revenue,
            "max_revenue": lambda p, v: _number(p, v),
            "inline": _bool,
        },
    )
    if values.get("revenue") == "signed" and values.get("allow_duplicates", False):
        # The signature covers (campaign, lead, event, amount), not the one trigger: a page could send
        # the same signed amount again under a new event_uuid, and each would count as a sale.
        raise ConfigError(
            f"{path}.revenue",
            '"signed" cannot go with allow_duplicates = true: one signature would pay for every trigger',
        )
    return EventConfig(name=name, **values)


def _sdk(path: str, raw: Any) -> SdkConfig:
    values = _fields(
        path,
        raw,
        {
            "cookie_name": _identifier,
            "cookie_days": lambda p, v: _int(p, v),
            "cookie_domain": _cookie_domain,
            "attribution": _choice("first", "last"),
            "pingtree_cookie": _identifier,
            "generate_transaction_id": _bool,
            "extra_params": _str_list(_identifier),
            "call_event": _str,
            "selectors": lambda p, v: {k: _identifier(f"{p}.{k}", x) for k, x in _table(p, v).items()},
            "consent": _bool,
            "fill_forms": _bool,
            "add_hidden_fields": _bool,
            "script_path": _first_party_path,
            "endpoint_path": _first_party_path,
        },
    )
    return SdkConfig(**values)


def _campaign(path: str, cid: str, raw: Any) -> CampaignConfig:
    _identifier(path, cid)
    if cid == "trigger":  # POST /api/event/trigger is Pingtree's cid-in-the-body form
        raise ConfigError(
            path, "'trigger' is reserved by POST /api/event/trigger; choose another campaign id"
        )
    values = _fields(
        path,
        raw,
        {
            "allowed_origins": _str_list(_origin),
            "conversion_timezone": _timezone,
            "server_fields": _scalar_map,
            "events": _table,
            "inactive_sources": _str_list(),
            "extra_fields": _str_list(_identifier),
            "unknown_fields": _choice("reject", "drop"),
            "allow_server_calls": _bool,
            "server_key": _str,
            "secret": _str,
            "bot_filter": _bool,
            "sdk": _table,
            "postbacks": _table,
            "external_clickid_from": _str_list(_identifier),
            "staging_origins": _str_list(_origin),
        },
    )
    values["events"] = {
        name: _event(f"{path}.events.{name}", name, ev) for name, ev in values.get("events", {}).items()
    }
    values["inactive_sources"] = frozenset(values.get("inactive_sources", ()))
    values["sdk"] = _sdk(f"{path}.sdk", values.get("sdk", {}))
    values["postbacks"] = {
        name: _postback(f"{path}.postbacks.{name}", name, pb)
        for name, pb in values.get("postbacks", {}).items()
    }
    campaign = CampaignConfig(cid=cid, **values)
    _check_campaign(path, campaign)
    return campaign


def _check_campaign(path: str, c: CampaignConfig) -> None:
    for name, ev in c.events.items():
        if ev.revenue == "signed" and not c.secret:
            raise ConfigError(f"{path}.secret", f'required because events.{name}.revenue is "signed"')
    if c.allow_server_calls and not c.server_key:
        raise ConfigError(f"{path}.server_key", "required because allow_server_calls is true")
    if c.sdk.call_event and c.sdk.call_event not in c.events:
        raise ConfigError(f"{path}.sdk.call_event", f"no event named {c.sdk.call_event!r} in this campaign")
    for selector, event in c.sdk.selectors.items():
        if event not in c.events:
            raise ConfigError(
                f"{path}.sdk.selectors.{selector}", f"no event named {event!r} in this campaign"
            )
    for name in c.sdk.extra_params:
        # The SDK would capture it and send it with every event, and the relay would refuse them all.
        if name not in ATTRIBUTION_FIELDS and name not in CLICK_IDS and name not in c.extra_fields:
            raise ConfigError(f"{path}.sdk.extra_params", f"{name!r} must also be listed in extra_fields")
    for i, name in enumerate(c.external_clickid_from):
        # A field the relay refuses can never be present: the mapping would silently never apply.
        if name not in CLICK_IDS and name not in ATTRIBUTION_FIELDS and name not in c.extra_fields:
            raise ConfigError(
                f"{path}.external_clickid_from[{i}]",
                f"{name!r} is not a click id, an attribution field or one of extra_fields",
            )
    _check_postbacks(path, c)


MIN_POSTBACK_TOKEN = 32  # characters: the token is the only credential of a postback URL


def _postback(path: str, name: str, raw: Any) -> PostbackConfig:
    _identifier(path, name)
    values = _fields(
        path,
        raw,
        {
            "token": _str,
            "event": _identifier,
            "event_param": _identifier,
            "min_duration": lambda p, v: _number(p, v),
            "duration_param": _identifier,
            "call_id_param": _identifier,
            "amount_format": _choice("strict", "lenient"),
            "params": lambda p, v: {
                _identifier(f"{p}.{k}", k): _identifier(f"{p}.{k}", x) for k, x in _table(p, v).items()
            },
            "ignore_params": _str_list(_identifier),
            "global_org_id": _identifier,
        },
    )
    if len(values.get("token", "")) < MIN_POSTBACK_TOKEN:
        raise ConfigError(f"{path}.token", f"required, at least {MIN_POSTBACK_TOKEN} random characters")
    if bool(values.get("event")) == bool(values.get("event_param")):
        raise ConfigError(f"{path}.event", "set exactly one of event (the event it fires) or event_param")
    if "min_duration" in values and not values.get("duration_param"):
        raise ConfigError(f"{path}.duration_param", "required because min_duration is set")
    return PostbackConfig(name=name, **values)


def _check_postbacks(path: str, c: CampaignConfig) -> None:
    """Each source's mapping against its campaign: the event exists, every name is a field Pingtree takes."""
    from .postbacks.mapping import postback_fields  # here: it imports this module

    accepted = postback_fields(c)
    for name, pb in c.postbacks.items():
        key = f"{path}.postbacks.{name}"
        if pb.event and pb.event not in c.events:
            raise ConfigError(f"{key}.event", f"no event named {pb.event!r} in this campaign")
        if pb.event and c.events[pb.event].revenue == "signed":
            raise ConfigError(
                f"{key}.event", f'events.{pb.event}.revenue is "signed": a postback cannot sign'
            )
        if pb.event and c.events[pb.event].allow_duplicates and not pb.call_id_param:
            # A retry and a second call would have the same idempotency key: the second call would be lost.
            raise ConfigError(
                f"{key}.call_id_param",
                f"required because events.{pb.event}.allow_duplicates is "
                "true (it tells a second call from a retry of the first)",
            )
        for platform, target in pb.params.items():
            if target not in accepted:
                raise ConfigError(
                    f"{key}.params.{platform}", f"{target!r} is not a Pingtree field this campaign accepts"
                )


# Each request in flight holds a socket and a few KB: far beyond this, a box runs out of file
# descriptors (a default ulimit of 1,024) before it runs out of throughput.
MAX_IN_FLIGHT_LIMIT = 5000


def _replaced_by_max_in_flight(path: str, value: Any) -> Any:
    raise ConfigError(
        path,
        "replaced by relay.max_in_flight: requests in flight to Pingtree per box "
        "(default 400), no longer per worker",
    )


def _relay(path: str, raw: Any) -> RelayConfig:
    values = _fields(
        path,
        raw,
        {
            "upstream_url": _url,
            "store": _store_url,
            "public_url": _url,
            "inline_timeout": lambda p, v: _number(p, v),
            "upstream_timeout": lambda p, v: _number(p, v, minimum=0.1),
            "max_age_hours": lambda p, v: _number(p, v),
            "lease_seconds": lambda p, v: _number(p, v, minimum=1),
            "retry_base_seconds": lambda p, v: _number(p, v, minimum=0.01),
            "retry_cap_seconds": lambda p, v: _number(p, v, minimum=0.01),
            "max_in_flight": lambda p, v: _int(p, v, minimum=1, maximum=MAX_IN_FLIGHT_LIMIT),
            "delivery_concurrency": _replaced_by_max_in_flight,
            "inline_concurrency": lambda p, v: _int(p, v),
            "trusted_proxy_hops": lambda p, v: _int(p, v),
            "max_body_bytes": lambda p, v: _int(p, v, minimum=256),
            "admin_token": _str,
            "secret_key": _str,
            "access_log": _bool,
            "decision_log_limit": lambda p, v: _int(p, v),
            "sdk_archive_dir": _str,
            "staging_upstream_url": lambda p, v: _url(p, v) if v != "" else "",
            "rate_limits": lambda p, v: RateLimits(**_fields(p, v, {"per_ip": _rate, "per_campaign": _rate})),
        },
    )
    if "upstream_url" not in values:
        raise ConfigError(f"{path}.upstream_url", "required")
    relay = RelayConfig(**values)
    # A lease that ends while its attempt can still be running would let a second process send the
    # same event at the same time. Each attempt is bounded as a whole by its timeout (server/forwarder.py).
    if relay.lease_seconds <= relay.upstream_timeout:
        raise ConfigError(
            f"{path}.lease_seconds", f"must be longer than upstream_timeout ({relay.upstream_timeout} s)"
        )
    if relay.lease_seconds <= relay.inline_timeout:
        raise ConfigError(
            f"{path}.lease_seconds", f"must be longer than inline_timeout ({relay.inline_timeout} s)"
        )
    if relay.inline_concurrency and relay.inline_timeout and relay.max_in_flight <= relay.inline_concurrency:
        # Inline attempts are part of the box's in-flight budget: the engine needs a share too.
        raise ConfigError(
            f"{path}.max_in_flight", f"must be more than inline_concurrency ({relay.inline_concurrency})"
        )
    return relay


def _check_endpoint_paths(campaigns: Mapping[str, CampaignConfig]) -> None:
    """First-party endpoint paths become POST routes: each must be free, and name one campaign only."""
    script_paths = {c.sdk.script_path for c in campaigns.values() if c.sdk.script_path}
    seen: dict[str, str] = {}
    for cid, campaign in campaigns.items():
        path = campaign.sdk.endpoint_path
        if not path:
            continue
        key = f"campaigns.{cid}.sdk.endpoint_path"
        if path == "/" or any(path == r or path.startswith(r + "/") for r in RESERVED_PATHS):
            raise ConfigError(key, "collides with a built-in route (" + ", ".join(RESERVED_PATHS) + ")")
        if path in seen:
            raise ConfigError(key, f"already used by campaigns.{seen[path]}")
        if path in script_paths:
            raise ConfigError(key, "is also a script_path; give the script and the endpoint different paths")
        seen[path] = cid


def _store_url(path: str, v: Any) -> str:
    if not isinstance(v, str) or not re.match(r"^(sqlite:///.+|redis://[^\s]+)$", v):
        raise ConfigError(
            path, 'expected "sqlite:///relative/path", "sqlite:////absolute/path" or "redis://HOST:PORT/DB"'
        )
    if v == "sqlite:///:memory:":
        # Each connection (one per thread) would get its own empty database: every event 503.
        raise ConfigError(
            path,
            "an in-memory SQLite database is private to each thread and lost at exit; "
            'give a file, e.g. "sqlite:////var/lib/pingtree-relay/outbox.sqlite3"',
        )
    return v


def store_location(url: str) -> str:
    """Where the store is, for people: a SQLite file's absolute path, or the Redis URL without its password."""
    if url.startswith("sqlite:///"):
        return "SQLite file " + os.path.abspath(url[len("sqlite:///") :])
    parts = urlsplit(url)
    if parts.password:
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        url = parts._replace(netloc=netloc).geturl()
    return "Redis " + url


def parse_config(
    data: Mapping[str, Any], *, source: str = "<memory>", base_dir: Path | None = None
) -> Config:
    """Build a :class:`Config` from parsed TOML, raising :class:`ConfigError` naming the bad key."""
    _fields("", data, {"relay": _table, "campaigns": _table})
    if "relay" not in data:
        raise ConfigError("relay.upstream_url", "required")
    relay = _relay("relay", data["relay"])
    if base_dir is not None and relay.store.startswith("sqlite:///"):
        relay = _resolve_sqlite(relay, base_dir)
    if base_dir is not None and relay.sdk_archive_dir and not os.path.isabs(relay.sdk_archive_dir):
        from dataclasses import replace

        relay = replace(relay, sdk_archive_dir=str((base_dir / relay.sdk_archive_dir).resolve()))
    campaigns = {
        cid: _campaign(f"campaigns.{cid}", cid, raw) for cid, raw in data.get("campaigns", {}).items()
    }
    _check_endpoint_paths(campaigns)
    from .config_risks import check_campaigns, check_relay  # here: config_risks imports this module

    warnings = check_relay(relay) + check_campaigns(campaigns)
    return Config(relay=relay, campaigns=campaigns, source=source, warnings=tuple(warnings))


def _resolve_sqlite(relay: RelayConfig, base_dir: Path) -> RelayConfig:
    """A relative SQLite path is relative to the config file, not to wherever the relay was started."""
    from dataclasses import replace

    path = relay.store[len("sqlite:///") :]
    if path != ":memory:" and not os.path.isabs(path):
        path = str((base_dir / path).resolve())
    return replace(relay, store="sqlite:///" + path)


def load_config(path: str | os.PathLike[str], *, text: str | None = None) -> Config:
    """Read and check a TOML config file. Raises :class:`ConfigError` (or ``OSError``).

    ``text`` stands in for the file's content (the copy a ``serve`` master validated); relative
    paths in it are still resolved against ``path``'s folder.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8") if text is None else text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"not valid TOML: {exc}") from None
    config = parse_config(data, source=str(p), base_dir=p.parent.resolve())
    token = os.environ.get("PINGTREE_RELAY_ADMIN_TOKEN")
    if token:
        from dataclasses import replace

        from .config_risks import MIN_SECRET_LENGTH

        if len(token) < MIN_SECRET_LENGTH:
            raise ConfigError("PINGTREE_RELAY_ADMIN_TOKEN", f"at least {MIN_SECRET_LENGTH} characters")
        config = replace(config, relay=replace(config.relay, admin_token=token))
    return config
