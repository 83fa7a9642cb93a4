"""The dashboard in Chromium, against a real relay process and the real sandbox.

Chromium comes from ``tests/browser/conftest.py`` (``browser_type_launch_args``); the relay runs
with two gunicorn workers, so a session and its CSRF token must hold whichever worker answers.
"""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Relay, RelayFactory, Sandbox, wait_for

pytestmark = pytest.mark.browser

TOKEN = "browser-admin-token-7d1e"


@pytest.fixture
def relay(relay_factory: RelayFactory) -> Relay:
    return relay_factory(admin_token=TOKEN)


def log_in(page: Page, relay: Relay, token: str = TOKEN) -> None:
    page.goto(relay.url + "/admin/")
    expect(page).to_have_url(relay.url + "/admin/login?next=/admin/")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Log in").click()


def no_csp_violations(console: list[str]) -> None:
    assert not [line for line in console if "Content Security Policy" in line], console


def test_login_refused_then_accepted(page: Page, relay: Relay, console: list[str]) -> None:
    log_in(page, relay, token="not-the-token")
    expect(page.locator("#login-error")).to_have_text("That token is not right.")
    page.goto(relay.url + "/admin/feed")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()  # still locked out

    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(relay.url + "/admin/feed")  # back where the operator was going
    expect(page.get_by_role("heading", name="Live feed")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "pingtree_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    no_csp_violations(console)


def test_test_event_appears_delivered(page: Page, relay: Relay, sandbox: Sandbox, console: list[str]) -> None:
    log_in(page, relay)
    page.get_by_role("link", name="Campaigns").click()
    campaign = page.locator("section#cmp_test")
    # The default tag is the stable URL, no integrity; the pinned one waits behind its trade-off.
    expect(campaign.locator("#snippet-cmp_test")).to_have_value(re.compile(r'/sdk/cmp_test\.js"></script>$'))
    expect(campaign.locator("#pinned-cmp_test")).to_be_hidden()
    campaign.get_by_text("Pinned variant with").click()
    expect(campaign.locator("#pinned-cmp_test")).to_have_value(
        re.compile(r'/sdk/cmp_test/v/[0-9a-f]{16}\.js" integrity="sha384-')
    )
    txn = f"dash-{uuid.uuid4().hex[:10]}"
    campaign.get_by_label("Event").select_option("quote_viewed")
    campaign.get_by_label("transaction_id").fill(txn)
    campaign.get_by_role("button", name="Send test event").click()

    expect(page.locator(".flash-ok")).to_contain_text(f"Test event quote_viewed for {txn}: delivered")
    row = page.locator("#feed-rows tr", has_text=txn)
    expect(row.locator(".state")).to_have_text("delivered")
    expect(row).to_contain_text("Event triggered successfully")
    arrived = wait_for(lambda: sandbox.events(transaction_id=txn), message="the test event at the sandbox")
    assert [e["event_id"] for e in arrived] == ["quote_viewed"]
    no_csp_violations(console)


def test_dead_letter_requeued_then_delivered(
    page: Page, relay: Relay, sandbox: Sandbox, console: list[str]
) -> None:
    sandbox.fault(status=400, message="Campaign paused at Pingtree", count=1)
    txn = f"dead-{uuid.uuid4().hex[:10]}"
    refused = relay.post({"event_id": "form_submitted", "transaction_id": txn, "pid": "src_live"})
    assert refused.status_code == 400, refused.text

    log_in(page, relay)
    page.get_by_role("link", name="Dead letters").click()
    letter = page.locator("article.dead", has_text=txn)
    expect(letter.locator(".reason")).to_contain_text("Campaign paused at Pingtree")
    letter.locator("summary").click()
    expect(letter.locator("pre")).to_contain_text('"ip_address": "127.0.0.0/24"')  # masked, never whole
    letter.get_by_role("button", name="Re-queue").click()
    expect(page.locator(".flash-ok")).to_have_text("Re-queued 1 dead letter.")
    expect(page.locator("article.dead", has_text=txn)).to_have_count(0)

    # The feed page refreshes itself: the row turns delivered without a reload.
    page.get_by_role("link", name="Live feed").click()
    page.get_by_label("transaction_id").fill(txn)
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#feed-rows tr", has_text=txn).locator(".state")).to_have_text(
        "delivered", timeout=15_000
    )
    arrived = wait_for(
        lambda: sandbox.events(transaction_id=txn), message="the re-queued event at the sandbox"
    )
    assert arrived[0]["body"]["pid"] == "src_live"
    no_csp_violations(console)


def test_overview_chart(page: Page, relay: Relay, console: list[str]) -> None:
    for _ in range(2):
        assert relay.post({"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex}).status_code == 200
    log_in(page, relay)
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    # Both may fall in one minute or straddle two: the legend's total is what must be exact.
    expect(page.locator(".legend .key", has_text="delivered")).to_have_text("delivered 2")
    expect(page.locator("#chart rect.bar.delivered").first).to_be_visible()
    no_csp_violations(console)


def test_script_versions_summed_over_workers(page: Page, relay: Relay, console: list[str]) -> None:
    """Pages' script loads reach the campaigns page whichever of the two workers served them."""
    for _ in range(6):  # a fresh connection each time: the workers take turns
        assert (
            httpx.get(relay.url + "/sdk/cmp_test.js", headers={"Connection": "close"}, timeout=5).status_code
            == 200
        )
    assert httpx.get(relay.url + "/sdk/cmp_test/v/0123456789abcdef.js", timeout=5).status_code == 200
    log_in(page, relay)

    def rows() -> dict[str, str]:
        page.goto(relay.url + "/admin/campaigns")
        table = page.locator("section#cmp_test table.versions tr[data-state]")
        return {row.get_attribute("data-state") or "": row.inner_text() for row in table.all()}

    # Each worker writes its counts every few seconds: poll, never sleep.
    seen = wait_for(
        lambda: (r := rows()) and "\t6\t" in r.get("stable", "") and "unknown" in r and r,
        timeout=30,
        message="6 stable loads and 1 unknown on the dashboard",
    )
    assert "default tag" in seen["stable"] and "events lost" in seen["unknown"]
    no_csp_violations(console)
