"""A tag pasted once keeps working: after an SDK setting changes, after ``public_url`` moves, after a
new release of the script, with the relay restarted on the new config and the page reloaded.

Two kinds of page: one that pastes the tag exactly as ``pingtree-relay snippet`` prints it (served
by its own small origin, allowed by the campaign), and the demo funnel (``static/demo``). The
browser cache is off, as for a visitor who comes back after the script's max-age: every load asks
the relay again. Each change also checks that the page really got the new build (or, for a pinned
tag, the old one), so a test cannot pass on a cached script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import SDK_LOADED, Funnel, sdk_campaigns
from tests.conftest import ROOT, Relay, RelayFactory, free_port, wait_for
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.browser

CHANGES = ("sdk_setting", "public_url", "release")
PINNED_VERSION = re.compile(r'src="[^"]+/sdk/cmp_test/v/([0-9a-f]{16})\.js" integrity="sha384-')


class _SiteHandler(SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Site:
    """A customer's page on its own origin, with the tag pasted into its ``<head>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_SiteHandler, directory=str(root)))
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paste(self, tag: str) -> None:
        (self.root / "landing.html").write_text(
            '<!doctype html>\n<html><head><meta charset="utf-8"><title>Pasted tag</title>\n'
            f"{tag}</head>\n<body><h1>A landing page</h1></body></html>\n"
        )

    def url(self, transaction_id: str) -> str:
        return f"{self.origin}/landing.html?transaction_id={transaction_id}"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    served = Site(root)
    yield served
    served.server.shutdown()
    served.server.server_close()


@pytest.fixture
def fresh_loads(page: Any) -> Any:
    """The browser cache off for this page: every load fetches the script from the relay again."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
    return page


class Scene:
    """A relay (with ``public_url`` set to itself) for the site and the demo pages, and its changes."""

    def __init__(self, relay_factory: RelayFactory, pages_port: int, site: Site, tmp_path: Path) -> None:
        self.relay_factory = relay_factory
        self.tmp_path = tmp_path
        base = sdk_campaigns(pages_port, cookie_days=30)
        self.campaigns = base.replace("allowed_origins = [", f'allowed_origins = ["{site.origin}", ', 1)
        port = free_port()
        self.relay = relay_factory(self.campaigns, port=port, public_url=f"http://127.0.0.1:{port}")
        self.other: Relay | None = None

    def snippet(self, *flags: str) -> str:
        """What ``pingtree-relay snippet cmp_test`` prints for this relay, as printed."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "snippet",
                "cmp_test",
                "--config",
                str(self.relay.config_path),
                *flags,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def change(self, kind: str) -> None:
        """Apply one kind of change and restart the relay on it."""
        self.relay.stop()
        config = self.relay.config_path
        if kind == "sdk_setting":
            config.write_text(config.read_text().replace("cookie_days = 30", "cookie_days = 7"))
        elif kind == "public_url":
            # The relay moves to a new address; the old one still answers (the pasted tag's src).
            port = free_port()
            new = f"http://127.0.0.1:{port}"
            config.write_text(config.read_text().replace(self.relay.url, new))
            self.other = self.relay_factory(self.campaigns, port=port, public_url=new)
        elif kind == "release":
            self.relay.cwd = release_tree(self.tmp_path)
        else:
            raise ValueError(kind)
        self.relay.start()


@pytest.fixture
def scene(relay_factory: RelayFactory, pages_port: int, site: Site, tmp_path: Path) -> Scene:
    return Scene(relay_factory, pages_port, site, tmp_path)


def release_tree(tmp_path: Path) -> Path:
    """A copy of the relay's source whose script build has a new line: the next release."""
    tree = tmp_path / "release-2"
    shutil.copytree(
        ROOT / "server", tree / "server", ignore=shutil.ignore_patterns("__pycache__", "sdk-builds")
    )
    shutil.copytree(ROOT / "js_templates", tree / "js_templates")
    # What the relay serves is the committed build (scripts/build-sdk): every variant of it changes.
    for template in (tree / "js_templates" / "compiled").glob("*.js.j2"):
        template.write_text('window.ptRelease = "2";' + template.read_text())
    return tree


class Loads:
    """What the page fetched: SDK script bodies and where events were posted."""

    def __init__(self, page: Any) -> None:
        self.scripts: list[bytes] = []
        self.posts: list[str] = []
        page.on("response", self._response)
        page.on("request", lambda r: self.posts.append(r.url) if "/api/event/" in r.url else None)

    def _response(self, response: Any) -> None:
        # The campaign's SDK only (/sdk/cmp_test...), not the debug panel (/sdk/pingtree.debug.js).
        if "/sdk/cmp_test" in response.url and response.request.resource_type == "script":
            try:
                self.scripts.append(response.body())
            except Exception:  # noqa: BLE001 - a blocked (SRI) response may have no body to read
                self.scripts.append(b"")


def tid() -> str:
    return "txn_" + uuid.uuid4().hex[:12]


def fire_from_pasted_page(page: Any, site: Site, sandbox: Any) -> None:
    t = tid()
    page.goto(site.url(t))
    page.wait_for_function(SDK_LOADED)
    answer = page.evaluate("() => pingtree('event', 'quote_viewed')")
    assert answer["status"] in (200, 202), answer
    wait_for(
        lambda: sandbox.events(event_id="quote_viewed", transaction_id=t), message=f"quote_viewed for {t}"
    )


def fire_from_demo(page: Any, funnel: Funnel, sandbox: Any) -> None:
    t = tid()
    funnel.open(page, "index.html", transaction_id=t)
    page.click("#get-quote")
    page.wait_for_url("**/form.html")
    page.wait_for_function(SDK_LOADED)  # the next page loads the same script, a check may look at it
    wait_for(
        lambda: sandbox.events(event_id="quote_viewed", transaction_id=t), message=f"quote_viewed for {t}"
    )


def check_new_build_reached_the_page(kind: str, page: Any, loads: Loads, scene: Scene) -> None:
    if kind == "sdk_setting":
        assert b"Max-Age=604800" in loads.scripts[-1]
    elif kind == "public_url":
        assert scene.other is not None
        assert any(url.startswith(scene.other.url + "/api/event/") for url in loads.posts), loads.posts
    else:
        assert page.evaluate("() => window.ptRelease") == "2"


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("where", ["pasted", "demo"])
def test_tag_keeps_working_after_a_change(
    where: str,
    change: str,
    scene: Scene,
    pages: str,
    site: Site,
    sandbox: Any,
    fresh_loads: Any,
    console: list[str],
) -> None:
    page = fresh_loads
    tag = scene.snippet()
    assert "integrity" not in tag
    site.paste(tag)
    funnel = Funnel(pages, scene.relay)

    def fire() -> None:
        if where == "pasted":
            fire_from_pasted_page(page, site, sandbox)
        else:
            fire_from_demo(page, funnel, sandbox)

    loads = Loads(page)
    fire()
    assert page.evaluate("() => window.ptRelease") is None and b"Max-Age=2592000" in loads.scripts[-1]
    scene.change(change)
    fire()
    check_new_build_reached_the_page(change, page, loads, scene)


def paste_pinned_tag(scene: Scene, site: Site) -> str:
    """Paste ``snippet --integrity`` into the site; the pinned build's version."""
    tag = scene.snippet("--integrity")
    version = PINNED_VERSION.search(tag).group(1)  # type: ignore[union-attr]
    site.paste(tag)
    return version


def sdk_requests(relay: Relay, version: str, state: str) -> float:
    """``pingtree_relay_sdk_requests_total`` of cmp_test's build ``version`` in ``state``, from /metrics."""
    samples = scrape(httpx.get(relay.url + "/metrics", timeout=5).text)
    return value(samples, "pingtree_relay_sdk_requests_total", cid="cmp_test", version=version, state=state)


@pytest.mark.parametrize("change", ["sdk_setting", "release"])
def test_pinned_tag_keeps_working_after_a_change(
    change: str, scene: Scene, site: Site, sandbox: Any, fresh_loads: Any, console: list[str]
) -> None:
    page = fresh_loads
    version = paste_pinned_tag(scene, site)
    loads = Loads(page)
    fire_from_pasted_page(page, site, sandbox)  # Chromium checked the SRI hash: the SDK ran
    pinned_body = loads.scripts[-1]
    scene.change(change)
    fire_from_pasted_page(page, site, sandbox)
    assert loads.scripts[-1] == pinned_body  # the old build, from the archive, as the tag demands
    assert page.evaluate("() => window.ptRelease") is None
    assert sdk_requests(scene.relay, version, "superseded") >= 1


def test_expired_pinned_build_shows_in_metrics_and_the_log(
    scene: Scene, site: Site, sandbox: Any, fresh_loads: Any, tmp_path: Path, console: list[str]
) -> None:
    page = fresh_loads
    version = paste_pinned_tag(scene, site)
    fire_from_pasted_page(page, site, sandbox)
    kept = tmp_path / "sdk-builds" / f"cmp_test.{version}.js"
    assert kept.exists()
    scene.relay.stop()
    month_ago = time.time() - 31 * 86400  # last current 31 days ago: past the 30 days kept
    os.utime(kept, (month_ago, month_ago))
    scene.change("sdk_setting")

    page.goto(site.url(tid()))
    # Nothing can run under that integrity any more: the browser says so, and so does the relay.
    wait_for(lambda: any("integrity" in line for line in console), message="the SRI error in the console")
    assert not page.evaluate("() => !!(window.pingtree && window.pingtree.loaded)")
    assert not kept.exists(), "the restarted relay prunes builds past their retention"
    assert wait_for(
        lambda: sdk_requests(scene.relay, "unknown", "unknown") >= 1,
        message="the unknown build counted in /metrics",
    )
    wait_for(lambda: "sdk_version_unknown" in scene.relay.log(), message="a warning line in the relay's log")
