"""A page on an origin its campaign does not allow: the SDK reads the relay's 403 and stops.

Before the 403 carried CORS headers the SDK saw only "Failed to fetch", took it for a network
error and retried for as long as the page lived (and on every later page). Real Chromium, a real
relay whose campaign does not list the pages' origin.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import Funnel, sdk_campaigns
from tests.browser.test_sdk_browser import QUEUED

pytestmark = pytest.mark.browser


def test_a_refused_origin_is_final_for_the_sdk(
    relay_factory: Any, pages: str, pages_port: int, page: Any, console: list[str]
) -> None:
    allowed = f'allowed_origins = ["http://127.0.0.1:{pages_port}", "http://localhost:{pages_port}", '
    campaigns = sdk_campaigns(pages_port).replace(
        allowed, 'allowed_origins = ["https://www.example.com", ', 1
    )
    assert campaigns != sdk_campaigns(pages_port), "the pages' origin must be taken out of cmp_test"
    funnel = Funnel(pages, relay_factory(campaigns))
    posts: list[str] = []
    page.on(
        "request", lambda r: posts.append(r.url) if r.method == "POST" and "/api/event/" in r.url else None
    )
    funnel.open(page, "index.html", transaction_id="txn_refused_origin")
    page.evaluate(
        "() => { window.answer = null; pingtree('event', 'quote_viewed').then(a => window.answer = a); }"
    )
    page.wait_for_function("() => window.answer", timeout=15_000)
    answer = page.evaluate("() => window.answer")
    assert (answer["status"], answer["message"]) == (403, "Origin not allowed")
    assert page.evaluate(QUEUED) == 0  # nothing left to retry, on this page or the next
    assert len(posts) == 1, posts
