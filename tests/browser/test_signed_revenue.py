"""A signed conversion end to end from a real page, and a tampered one (Chromium via Playwright).

The merchant's backend signs the revenue (here: the test, with the same helper a backend would use);
the page passes the token to the SDK as the ``signature`` field. A page that edits the amount gets
403 and nothing reaches Pingtree; the genuine conversion arrives with its amount.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from server.validation import sign_revenue
from tests.browser.conftest import Funnel, sdk_campaigns
from tests.conftest import wait_for

pytestmark = pytest.mark.browser

SECRET = "merchant-backend-secret"


def signed_campaigns(pages_port: int) -> str:
    toml = sdk_campaigns(pages_port)
    toml = toml.replace("[campaigns.cmp_test]\n", f'[campaigns.cmp_test]\nsecret = "{SECRET}"\n', 1)
    signed = toml.replace(
        "[campaigns.cmp_test.events.sale_completed]\nconversion = true\nmax_revenue = 5000",
        '[campaigns.cmp_test.events.sale_completed]\nconversion = true\nrevenue = "signed"',
    )
    assert signed != toml, "the base campaigns changed: sale_completed is no longer where this test expects"
    return signed


@pytest.fixture
def funnel(relay_factory: Any, pages: str, pages_port: int) -> Funnel:
    return Funnel(pages, relay_factory(signed_campaigns(pages_port)))


def test_signed_conversion_from_a_page_and_a_tampered_one(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    t = f"txn_{uuid.uuid4()}"
    token = sign_revenue(SECRET, "cmp_test", t, "sale_completed", "45.50")
    funnel.open(page, "csp.html", transaction_id=t)

    tampered = page.evaluate(
        "(sig) => pingtree('conversion', 'sale_completed', 4550, {signature: sig})", token
    )
    assert (tampered["status"], tampered["message"]) == (403, "Invalid revenue signature")
    unsigned = page.evaluate("() => pingtree('conversion', 'sale_completed', 45.5)")
    assert (unsigned["status"], unsigned["message"]) == (403, "Missing revenue signature")
    assert sandbox.events(transaction_id=t) == []

    genuine = page.evaluate(
        "(sig) => pingtree('conversion', 'sale_completed', 45.5, {signature: sig})", token
    )
    assert genuine["status"] == 200 and genuine["data"]["conversion"] is True, genuine
    [event] = wait_for(lambda: sandbox.events(transaction_id=t), message="the signed conversion")
    assert event["body"]["amount"] == 45.5 and "signature" not in event["body"]
    assert [r for r in sandbox.requests() if "4550" in str(r["body"])] == []
