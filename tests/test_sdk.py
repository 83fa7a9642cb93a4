"""The SDK script: its config, rendering, escaping, size, and how the blueprint serves it.

The blueprint runs on a bare Flask app here (``server.sdk.bp`` plus a stand-in for
``app.extensions["relay"]``), so these tests need nothing of the relay itself.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import types
from dataclasses import replace
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from server import sdk
from server.config import Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "</script><script>alert(1)</script>\"'\u2028\u2029`${x}`<!--"


@pytest.fixture(autouse=True)
def archive_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SDK builds are archived under the test's tmp_path, never beside a config in the checkout."""
    folder = tmp_path / "sdk-builds"
    monkeypatch.setattr(sdk, "default_dir", lambda config: folder)
    return folder


def make_config(sdk_table: dict | None = None, **relay: str) -> Config:
    return parse_config(
        {
            "relay": {"upstream_url": "http://127.0.0.1:1", **relay},
            "campaigns": {
                "cmp_a": {
                    "events": {"quote_viewed": {}, "call_clicked": {}, "sale": {"conversion": True}},
                    "extra_fields": ["gclid", "promo_code"],
                    "sdk": sdk_table or {},
                },
            },
        }
    )


def demo_config() -> Config:
    return load_config(ROOT / "server" / "demo.toml")


def client_for(config: Config) -> FlaskClient:
    app = Flask(__name__)
    app.extensions["relay"] = types.SimpleNamespace(config=config)
    app.register_blueprint(sdk.bp)
    return app.test_client()


def embedded_config(js: str) -> dict:
    """The one JSON object the script carries: the only part that is not the build's own code."""
    assert js.startswith("(") and "={" in js, js[:300]
    cfg, end = json.JSONDecoder().raw_decode(js, js.index("={") + 1)
    return cfg


# --- the pure part ---------------------------------------------------------------------------------


def test_script_config_of_the_demo_campaign() -> None:
    config = demo_config()
    cfg = sdk.script_config(config.campaigns["cmp_demo"], config.relay)
    assert cfg == {
        "cid": "cmp_demo",
        "path": "/api/event/cmp_demo",
        "cookie": "pt_attr",
        "cookieAttrs": f";Max-Age={30 * 86400};Path=/;SameSite=Lax",
        "ptCookie": "pt_transaction_id",
        "call": "call_clicked",
    }


def test_script_config_carries_every_sdk_setting() -> None:
    config = make_config(
        {
            "cookie_name": "attr",
            "cookie_days": 7,
            "cookie_domain": ".example.com",
            "attribution": "last",
            "pingtree_cookie": "ptid",
            "generate_transaction_id": False,
            # gclid and pid are captured by every campaign already: only promo_code is extra.
            "extra_params": ["gclid", "pid", "promo_code"],
            "selectors": {".buy": "sale"},
            "endpoint_path": "/t/e",
        },
        public_url="https://relay.example.com",
    )
    cfg = sdk.script_config(config.campaigns["cmp_a"], config.relay)
    assert cfg == {
        "cid": "cmp_a",
        "base": "https://relay.example.com",
        "path": "/t/e",
        "cookie": "attr",
        "cookieAttrs": f";Max-Age={7 * 86400};Path=/;SameSite=Lax;Domain=.example.com",
        "last": True,
        "ptCookie": "ptid",
        "generate": False,
        "extra": ["promo_code"],
        "selectors": [[".buy", "sale"]],
    }


def test_server_only_fields_are_never_attribution_params() -> None:
    from server.config import SERVER_ONLY_FIELDS

    assert not SERVER_ONLY_FIELDS & set(sdk.URL_PARAMS)


@pytest.mark.parametrize(
    "names",
    [
        sdk.SDK_URL_PARAMS,
        sdk.SDK_SERVER_ONLY,
        ("a1", "a2", "a4", "b_x", "b_y", "b_z", "b_", "c3", "s1", "s2", "s3", "z_a1", "z_a2", "z_a3"),
    ],
)
def test_name_pattern_matches_exactly_its_names(names: tuple[str, ...]) -> None:
    pattern = sdk.name_pattern(names)
    assert pattern.startswith("/") and pattern.endswith("/")
    compiled = re.compile(pattern[1:-1])  # the subset of JavaScript's syntax it uses means the same here
    assert all(compiled.fullmatch(name) for name in names)
    # Nothing else: no prefix, extension, case change or neighbouring digit of a name matches.
    near = [(n[:-1], n + "x", n + "_", "x" + n, n.upper(), n.swapcase(), n + "1") for n in names]
    digits = {n[:-1] + str(d) for n in names for d in range(10)}
    others = {other for group in near for other in group} | digits
    assert not any(compiled.search(other) for other in others - set(names))
    assert compiled.search("transaction_id\nx") is None and compiled.search("x\ntransaction_id") is None


def test_name_pattern_takes_field_names_only() -> None:
    with pytest.raises(ValueError, match="not a field name"):
        sdk.name_pattern(["ok", "a|b"])


@pytest.mark.parametrize(
    ("table", "present", "absent"),
    [
        ({}, ["data-pt-event", "input[type=hidden]"], ["tcpa_consent", "tel:", ".selectors"]),
        ({"call_event": "call_clicked"}, ["tel:"], ["tcpa_consent"]),
        ({"consent": True}, ["tcpa_consent", '"consent"'], ["tel:"]),
        ({"selectors": {".buy": "sale"}}, [".selectors"], ["tel:"]),
        ({"fill_forms": False}, ["data-pt-event"], ["input[type=hidden]"]),
        ({}, ["data-pt-event"], ['createElement("input")']),
        ({"add_hidden_fields": True}, ['createElement("input")', "input[type=hidden]"], []),
        (
            {"add_hidden_fields": True, "fill_forms": False},
            ['createElement("input")', "input[type=hidden]"],
            [],
        ),
    ],
)
def test_unused_features_are_left_out(table: dict, present: list[str], absent: list[str]) -> None:
    config = make_config(table)
    js = sdk.render_sdk(config.campaigns["cmp_a"], config.relay).body.decode()
    for text in present:
        assert text in js
    for text in absent:
        assert text not in js


def test_rendering_is_cached_per_script_config() -> None:
    config = demo_config()
    campaign = config.campaigns["cmp_demo"]
    first = sdk.render_sdk(campaign, config.relay)
    # A config object rebuilt with the same SDK-relevant values reuses the build...
    same = replace(campaign, conversion_timezone="PST", server_fields={"cost": 9})
    assert sdk.render_sdk(same, config.relay) is first
    # ...and a change that reaches the script makes a new one.
    other = replace(campaign, sdk=replace(campaign.sdk, cookie_days=9))
    assert sdk.render_sdk(other, config.relay).etag != first.etag


def test_script_is_minified_and_csp_clean() -> None:
    config = demo_config()
    js = sdk.render_sdk(config.campaigns["cmp_demo"], config.relay).body.decode()
    assert "//" not in js.replace("://", "") and "/*" not in js
    assert len(js.splitlines()) < 40
    for forbidden in (
        "eval(",
        "new Function",
        "innerHTML",
        "setAttribute('style",
        ".style.",
        "document.write",
    ):
        assert forbidden not in js


def test_hostile_config_values_cannot_break_out() -> None:
    # The config refuses such a cookie_domain; were one to get through, the script still holds.
    with pytest.raises(ConfigError):
        make_config({"cookie_domain": HOSTILE})
    config = make_config()
    campaign = config.campaigns["cmp_a"]
    campaign = replace(campaign, sdk=replace(campaign.sdk, cookie_domain=HOSTILE))
    js = sdk.render_sdk(campaign, config.relay).body.decode()
    assert "</script" not in js.lower() and "<!--" not in js
    assert "\u2028" not in js and "\u2029" not in js
    assert embedded_config(js)["cookieAttrs"].endswith(";Domain=" + HOSTILE)


def test_hostile_values_through_the_renderer_directly() -> None:
    # Hand-built config objects (bypassing config validation): every string field at once.
    config = make_config()
    campaign = config.campaigns["cmp_a"]
    hostile_sdk = replace(
        campaign.sdk,
        cookie_domain=HOSTILE,
        cookie_name="a'b",
        pingtree_cookie='x"y',
        call_event=HOSTILE,
        selectors={HOSTILE: HOSTILE},
        extra_params=(HOSTILE,),
    )
    relay = replace(config.relay, public_url="https://x.example/</script>")
    js = sdk.render_sdk(replace(campaign, cid="c</script>", sdk=hostile_sdk), relay).body.decode()
    assert "</script" not in js.lower()
    cfg = embedded_config(js)
    assert cfg["call"] == HOSTILE and cfg["selectors"] == [[HOSTILE, HOSTILE]] and cfg["cid"] == "c</script>"
    _node_check(js)


@pytest.mark.parametrize(
    "table",
    [
        {},
        {
            "consent": True,
            "selectors": {"a.b, #c": "sale"},
            "call_event": "call_clicked",
            "attribution": "last",
            "extra_params": ["gclid"],
            "add_hidden_fields": True,
        },
    ],
)
def test_script_parses(table: dict) -> None:
    config = make_config(table)
    _node_check(sdk.render_sdk(config.campaigns["cmp_a"], config.relay).body.decode())


def _node_check(js: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the browser tests run the script anyway)")
    result = subprocess.run([node, "--check", "-"], input=js, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- serving ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/sdk/cmp_demo.js", "/sdk/cmp_demo/pingtree.js"])
def test_serves_the_script(path: str) -> None:
    config = demo_config()
    r = client_for(config).get(path, headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert r.headers["Cache-Control"] == "public, max-age=300"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Vary"] == "Accept-Encoding"
    assert "Content-Encoding" not in r.headers
    assert r.data == sdk.render_sdk(config.campaigns["cmp_demo"], config.relay).body
    etag = r.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")


@pytest.mark.parametrize(
    ("accept", "encoding"),
    [
        ("gzip, deflate", "gzip"),
        ("gzip, deflate, br", "br"),
        ("br;q=0, gzip", "gzip"),
        ("identity", None),
    ],
)
def test_compressed_when_accepted(accept: str, encoding: str | None) -> None:
    import brotli

    r = client_for(demo_config()).get("/sdk/cmp_demo.js", headers={"Accept-Encoding": accept})
    assert r.headers.get("Content-Encoding") == encoding
    body = {"gzip": gzip.decompress, "br": brotli.decompress, None: lambda b: b}[encoding](r.data)
    assert body == sdk.render_sdk(demo_config().campaigns["cmp_demo"], demo_config().relay).body
    assert int(r.headers["Content-Length"]) == len(r.data)


def test_etag_gives_304() -> None:
    client = client_for(demo_config())
    first = client.get("/sdk/cmp_demo.js", headers={"Accept-Encoding": "gzip"})
    again = client.get(
        "/sdk/cmp_demo.js", headers={"If-None-Match": first.headers["ETag"], "Accept-Encoding": "gzip"}
    )
    assert again.status_code == 304 and again.data == b""
    assert again.headers["ETag"] == first.headers["ETag"]
    assert again.headers["Cache-Control"] == "public, max-age=300"
    # The gzip ETag still names the current version for a client that now wants plain bytes.
    plain = client.get("/sdk/cmp_demo.js", headers={"If-None-Match": first.headers["ETag"]})
    assert plain.status_code == 304
    stale = client.get("/sdk/cmp_demo.js", headers={"If-None-Match": '"0123"'})
    assert stale.status_code == 200


def test_unknown_campaign_is_a_404_javascript_comment() -> None:
    r = client_for(demo_config()).get("/sdk/cmp_nope.js")
    assert r.status_code == 404
    assert r.headers["Content-Type"].startswith("application/javascript")
    assert r.data.startswith(b"/*") and r.data.rstrip().endswith(b"*/")


def test_first_party_script_path() -> None:
    config = make_config({"script_path": "/p/lib.js"})
    client = client_for(config)
    r = client.get("/p/lib.js")
    assert r.status_code == 200 and r.data == sdk.render_sdk(config.campaigns["cmp_a"], config.relay).body
    assert client.head("/p/lib.js").status_code == 200
    assert client.post("/p/lib.js").status_code in (404, 405)
    assert client.get("/p/other.js").status_code == 404


# --- the snippet -------------------------------------------------------------------------------------


def test_default_snippet_is_the_stable_url_without_integrity() -> None:
    # The tag a marketer pastes once: any SRI hash on this URL breaks at the next config change.
    config = demo_config()
    html = sdk.snippet_tag(config, "cmp_demo", "https://relay.example.com/")
    stub, tag = html.splitlines()
    assert stub == f"<script>{sdk.STUB}</script>"
    assert tag == '<script defer src="https://relay.example.com/sdk/cmp_demo.js"></script>'
    assert sdk.snippet_tag(config, "cmp_demo", "https://r.example", stub=False) == tag.replace(
        "https://relay.example.com", "https://r.example"
    )


def test_pinned_snippet_names_its_build_and_matches_its_sri() -> None:
    config = demo_config()
    tag = sdk.snippet_tag(config, "cmp_demo", "https://relay.example.com", stub=False, integrity=True)
    match = re.fullmatch(
        r'<script defer src="https://relay\.example\.com(/sdk/cmp_demo/v/([0-9a-f]{16})\.js)" '
        r'integrity="sha384-([A-Za-z0-9+/=]+)" crossorigin="anonymous"></script>',
        tag,
    )
    assert match, tag
    r = client_for(config).get(match.group(1))
    assert r.status_code == 200
    assert base64.b64encode(hashlib.sha384(r.data).digest()).decode() == match.group(3)
    assert hashlib.sha256(r.data).hexdigest()[:16] == match.group(2)
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"


def test_csp_sources_allow_the_stub_by_hash_and_the_relay_by_origin() -> None:
    config = make_config(public_url="https://relay.example.com/base")
    sources = sdk.csp_sources(config, "cmp_a")
    digest = base64.b64encode(hashlib.sha256(sdk.STUB.encode()).digest()).decode()
    assert sources == {
        "script-src": [f"'sha256-{digest}'", "https://relay.example.com"],
        "connect-src": ["https://relay.example.com"],
    }
    # Served from a first-party host while posting to public_url: both are connect sources.
    assert sdk.csp_sources(config, "cmp_a", "https://www.shop.example")["connect-src"] == [
        "https://relay.example.com",
        "https://www.shop.example",
    ]
    with pytest.raises(KeyError):
        sdk.csp_sources(config, "nope")


def test_debug_panel_is_a_separate_script_served_with_cors() -> None:
    client = client_for(demo_config())
    answer = client.get(sdk.DEBUG_PANEL_PATH)
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == "*"
    assert answer.headers["Content-Type"].startswith("application/javascript")
    assert b"pingtree-debug" in answer.data
    # The debug build only names it; none of the panel's code is in any build.
    config = demo_config()
    js = sdk.render_sdk(config.campaigns["cmp_demo"], config.relay, debug=True).body.decode()
    assert sdk.DEBUG_PANEL_PATH in js and "pingtree-debug" not in js


def test_visitors_get_no_debug_code_only_the_loader_of_the_debug_build() -> None:
    config = demo_config()
    campaign = config.campaigns["cmp_demo"]
    normal = sdk.render_sdk(campaign, config.relay).body.decode()
    debug = sdk.render_sdk(campaign, config.relay, debug=True).body.decode()
    # The normal build loads the debug build in debug mode, and keeps no trail.
    assert "/debug.js" in normal and "pt_debug=1" in normal
    assert sdk.DEBUG_PANEL_PATH not in normal and "landing" not in normal and ".t=" not in normal
    # The debug build is that script with the trail and the panel, and loads nothing in its place.
    assert sdk.DEBUG_PANEL_PATH in debug and '"landing"' in debug and "/debug.js" not in debug
    assert "import.meta.url" in debug and "currentScript" not in debug
    assert len(normal) < len(debug)


def test_the_debug_build_is_served_beside_the_script_for_known_campaigns_only() -> None:
    config = demo_config()
    client = client_for(config)
    answer = client.get(sdk.debug_path("cmp_demo"), headers={"Accept-Encoding": "identity"})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == "*"
    assert answer.headers["Content-Type"].startswith("application/javascript")
    assert answer.data == sdk.render_sdk(config.campaigns["cmp_demo"], config.relay, debug=True).body
    assert answer.headers["Cache-Control"] == sdk.CACHE_CONTROL
    missing = client.get(sdk.debug_path("cmp_nope"))
    assert missing.status_code == 404 and b"unknown campaign" in missing.data


def test_debug_build_parses_as_a_module() -> None:
    config = demo_config()
    _node_module_check(sdk.render_sdk(config.campaigns["cmp_demo"], config.relay, debug=True).body.decode())


def test_debug_panel_parses() -> None:
    _node_module_check(sdk.debug_panel_script().body.decode())


def _node_module_check(js: str) -> None:
    """``js`` parses as a module (the debug build and the panel are import()ed)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to check a module's syntax")
    result = subprocess.run(
        [node, "--input-type=module", "--check", "-"], input=js, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_snippet_uses_script_path_and_public_url() -> None:
    config = make_config({"script_path": "/p/lib.js"}, public_url="https://relay.example.com")
    assert 'src="https://relay.example.com/p/lib.js"' in sdk.snippet_tag(config, "cmp_a")
    # A pinned build lives on /sdk/ only: script_path always names the current build.
    assert 'src="https://relay.example.com/sdk/cmp_a/v/' in sdk.snippet_tag(config, "cmp_a", integrity=True)
    with pytest.raises(KeyError):
        sdk.snippet_tag(config, "cmp_missing")
    with pytest.raises(ValueError):
        sdk.snippet_tag(make_config(), "cmp_a")


# --- pinned builds after a change --------------------------------------------------------------------


def pinned_url(config: Config, cid: str = "cmp_a") -> str:
    tag = sdk.snippet_tag(config, cid, "https://r.example", stub=False, integrity=True)
    return re.search(r'src="https://r\.example([^"]+)"', tag).group(1)


def with_days(config: Config, days: int) -> Config:
    campaign = config.campaigns["cmp_a"]
    return replace(
        config, campaigns={"cmp_a": replace(campaign, sdk=replace(campaign.sdk, cookie_days=days))}
    )


def test_superseded_build_is_served_after_a_config_change_and_a_restart(archive_in_tmp: Path) -> None:
    before = make_config()
    old_body = client_for(before).get(pinned_url(before)).data  # served once: archived
    after = with_days(before, 7)
    assert pinned_url(after) != pinned_url(before)
    sdk.package.cache_clear()  # a fresh process: nothing of the old build left in memory
    client = client_for(after)  # a new app, as after a restart with the new config
    r = client.get(pinned_url(before))
    assert r.status_code == 200 and r.data == old_body
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert client.get("/sdk/cmp_a.js").data == sdk.render_sdk(after.campaigns["cmp_a"], after.relay).body
    assert sorted(p.name for p in archive_in_tmp.glob("*.js")) == sorted(
        f"cmp_a.{v}.js" for v in (pinned_url(before)[-19:-3], pinned_url(after)[-19:-3])
    )


def test_pin_keeps_a_build_the_relay_never_served(archive_in_tmp: Path) -> None:
    # snippet --integrity, then the config changes before any page loads the tag.
    before = make_config()
    sdk.pin(before, "cmp_a")
    r = client_for(with_days(before, 9)).get(pinned_url(before))
    assert r.status_code == 200 and "X-Pingtree-Relay-Sdk" not in r.headers


def test_expired_or_unknown_build_gets_the_current_one_with_a_warning(archive_in_tmp: Path) -> None:
    before = make_config()
    client_for(before).get(pinned_url(before))
    for path in archive_in_tmp.glob("*.js"):  # last current 31 days ago: past the retention
        old = path.stat().st_mtime - 31 * 86400
        os.utime(path, (old, old))
    after = with_days(before, 7)
    client = client_for(after)
    current = sdk.render_sdk(after.campaigns["cmp_a"], after.relay).body
    for url in (pinned_url(before), "/sdk/cmp_a/v/0123456789abcdef.js", "/sdk/cmp_a/v/not-a-hash.js"):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store", url
        assert r.headers["X-Pingtree-Relay-Sdk"] == "unknown-version"
        assert r.data.startswith(b"console.warn(") and b"pingtree-relay snippet cmp_a" in r.data
        assert r.data.endswith(current)
    _node_check(r.data.decode())
    assert client.get("/sdk/cmp_nope/v/0123456789abcdef.js").status_code == 404


def test_a_damaged_archive_file_is_not_served(archive_in_tmp: Path) -> None:
    config = make_config()
    url = pinned_url(config)
    client_for(config).get(url)
    next(archive_in_tmp.glob("*.js")).write_bytes(b"alert('tampered')")
    r = client_for(with_days(config, 3)).get(url)
    assert r.headers["X-Pingtree-Relay-Sdk"] == "unknown-version" and b"tampered" not in r.data


def test_versions_seen_counts_each_tag_kind() -> None:
    before = make_config()
    old = pinned_url(before)
    client_for(before).get(old)
    after = with_days(before, 7)
    app_client = client_for(after)
    for url in ("/sdk/cmp_a.js", "/sdk/cmp_a.js", pinned_url(after), old, "/sdk/cmp_a/v/0123456789abcdef.js"):
        app_client.get(url)
    with app_client.application.test_request_context():
        rows = sdk.versions_seen()["cmp_a"]
    got = sorted((r["state"], r["version"], r["count"]) for r in rows)
    new_version = pinned_url(after)[-19:-3]
    assert (
        ("current", new_version, 1) in got
        and ("stable", new_version, 2) in got
        and ("superseded", old[-19:-3], 1) in got
        and ("unknown", "unknown", 1) in got
    ), got


def test_stub_is_valid_javascript() -> None:
    _node_check(sdk.STUB)
