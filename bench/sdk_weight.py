"""SDK weight: bytes of the per-campaign script, and what it costs a page in Chromium.

Sizes come from the relay's own renderer (:func:`server.sdk.render_sdk`, the exact bytes
``GET /sdk/{cid}.js`` serves in each encoding); "raw" is the readable template rendered with the
campaign's config, before the build (:mod:`server.sdk_build`) minifies it. Page figures come from
the demo funnel served by ``pingtree-relay demo``, loaded in a fresh Chromium context each time
(a first visit, nothing cached).
"""

from __future__ import annotations

import secrets
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server.config import Config, parse_config

from . import servers
from .chromium import launch_args

# Issue 13's budgets for the script as served gzip (tests/test_sdk_build.py checks them; bytes are
# deterministic); bench/ reports each figure against them.
DEMO_GZIP_BUDGET = 2000
EVERY_FEATURE_GZIP_BUDGET = 2500


@dataclass(frozen=True)
class Weight:
    campaign: str
    raw: int
    minified: int
    gzip: int
    brotli: int


@dataclass(frozen=True)
class PageLoad:
    requests: int  # every request of the landing page's load
    bytes: int  # headers + encoded bodies, both directions
    sdk_requests: int  # of which the SDK's own: the script and any event posts
    sdk_bytes: int
    dcl_to_relay_ms: float  # median: DOMContentLoaded -> the relay stored the page's first event
    dcl_to_relay_all: list[float]


def all_features_config() -> Config:
    """A campaign with every SDK feature switched on (the largest script a campaign can get)."""
    return parse_config(
        {
            "relay": {"upstream_url": "http://127.0.0.1:1", "public_url": "https://track.example.com"},
            "campaigns": {
                "cmp_full": {
                    "allowed_origins": ["https://www.example.com"],
                    "extra_fields": ["gclid", "fbclid"],
                    "events": {
                        "quote_viewed": {},
                        "call_clicked": {"allow_duplicates": True},
                        "sale_completed": {"conversion": True},
                    },
                    "sdk": {
                        "cookie_domain": "example.com",
                        "attribution": "last",
                        "extra_params": ["gclid", "fbclid"],
                        "call_event": "call_clicked",
                        "selectors": {"#buy": "sale_completed", ".quote": "quote_viewed"},
                        "consent": True,
                        "fill_forms": True,
                        "add_hidden_fields": True,
                        "script_path": "/p/t.js",
                        "endpoint_path": "/p/e",
                    },
                }
            },
        }
    )


def weigh(config: Config, cid: str) -> Weight:
    """Raw, minified, gzip and brotli bytes of ``cid``'s script."""
    from server import sdk, sdk_build

    campaign = config.campaigns[cid]
    built = sdk.render_sdk(campaign, config.relay)
    raw = sdk_build.render_source(  # the readable source, before the build minifies it
        sdk.build_flags(campaign), sdk.script_config(campaign, config.relay)
    )
    return Weight(
        campaign=cid,
        raw=len(raw.encode()),
        minified=len(built.body),
        gzip=len(built.gzip),
        brotli=len(built.br),
    )


def weights() -> list[Weight]:
    from server.cli import demo_config

    return [weigh(demo_config(8000), "cmp_demo"), weigh(all_features_config(), "cmp_full")]


def page_load(workdir: Path, trials: int = 5) -> PageLoad:
    """Load the demo landing page once (requests, bytes) and its thank-you page ``trials`` times."""
    from playwright.sync_api import sync_playwright

    from server.outbox import open_store

    with servers.demo(workdir) as demo, sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_args())
        try:
            requests, total, sdk_requests, sdk_bytes = _landing(browser, demo.url)
            store = open_store(f"sqlite:///{workdir / f'pingtree-relay-demo-{demo.port}.sqlite3'}")
            delays = [_dcl_to_relay(browser, demo.url, store) for _ in range(trials)]
            store.close()
        finally:
            browser.close()
    return PageLoad(
        requests=requests,
        bytes=total,
        sdk_requests=sdk_requests,
        sdk_bytes=sdk_bytes,
        dcl_to_relay_ms=round(statistics.median(delays), 1),
        dcl_to_relay_all=delays,
    )


def _landing(browser: Any, base: str) -> tuple[int, int, int, int]:
    context = browser.new_context()
    page = context.new_page()
    finished: list[Any] = []
    page.on("requestfinished", lambda request: finished.append(request))
    page.goto(
        f"{base}/demo/index.html?transaction_id=tland{secrets.token_hex(4)}&utm_source=google",
        wait_until="networkidle",
    )
    sizes = [(r.url, sum(r.sizes().values())) for r in finished]
    context.close()
    sdk = [size for url, size in sizes if "/sdk/" in url or "/api/event" in url]
    return len(sizes), sum(size for _, size in sizes), len(sdk), sum(sdk)


def _dcl_to_relay(browser: Any, base: str, store: Any) -> float:
    """ms from the thank-you page's DOMContentLoaded (it fires its conversion then) to the relay's receipt."""
    context = browser.new_context()
    page = context.new_page()
    tid = f"tthx{secrets.token_hex(4)}"
    with page.expect_response(lambda r: "/api/event/" in r.url, timeout=15000):
        page.goto(f"{base}/demo/thanks.html?transaction_id={tid}&utm_source=google")
    dcl = page.evaluate(
        "performance.timeOrigin + performance.getEntriesByType('navigation')[0].domContentLoadedEventStart"
    )
    context.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = store.find(transaction_id=tid, limit=5)
        if records:
            return round(min(r.received_at for r in records) * 1000 - dcl, 1)
        time.sleep(0.05)
    raise RuntimeError(f"the relay never stored an event for {tid}")


def to_dict(weights_: list[Weight], load: PageLoad | None) -> dict[str, Any]:
    return {"weights": [asdict(w) for w in weights_], "page": asdict(load) if load else None}
