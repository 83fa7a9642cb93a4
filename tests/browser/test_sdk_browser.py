"""The SDK in a real Chromium: the demo funnel on its own origin, a real relay, the sandbox as Pingtree.

Each test polls with a deadline (``wait_for``) and never sleeps to synchronise; on failure the
browser console and what the sandbox received are printed (see conftest).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from server import sdk
from server.config import load_config
from tests.browser.conftest import SDK_LOADED, Funnel, _toml, sdk_campaigns
from tests.conftest import wait_for

pytestmark = pytest.mark.browser

ATTRIBUTION = {
    "pid": "src_demo",
    "clid": "clk_9",
    "sub1": "ad42",
    "sub2": "s2",
    "sub3": "s3",
    "sub4": "s4",
    "adv1": "a1",
    "adv2": "a2",
    "adv3": "a3",
    "adv4": "a4",
    "adv5": "a5",
    "utm_source": "google",
    "utm_medium": "cpc",
    "utm_campaign": "spring",
    "utm_adgroup": "grp",
    "utm_matchtype": "exact",
    "utm_term": "car insurance",
    "utm_content": "v1",
    "utm_creative": "cr7",
    "utm_placement": "top",
    "external_clickid": "ext-1",
}
# A landing URL that tries to set prices: the browser may not (the security rule), only the server.
PRICES = {"cost": "99", "cost_operation": "override", "min_price": "50", "adSpend": "7"}
QUEUED = "() => Object.keys(localStorage).filter(k => k.startsWith('pt:cmp_test:')).length"


def tid() -> str:
    return "txn_" + uuid.uuid4().hex[:12]


def events(sandbox: Any, event_id: str, transaction_id: str) -> list[dict[str, Any]]:
    return [e["body"] for e in sandbox.events(event_id=event_id, transaction_id=transaction_id)]


def arrived(
    sandbox: Any, event_id: str, transaction_id: str, count: int = 1, timeout: float = 15
) -> list[dict]:
    return wait_for(
        lambda: (found := events(sandbox, event_id, transaction_id)) and len(found) >= count and found,
        timeout=timeout,
        message=f"{count} x {event_id} for {transaction_id}",
    )


@pytest.fixture
def funnel(relay_factory: Any, pages: str, pages_port: int) -> Funnel:
    return Funnel(pages, relay_factory(sdk_campaigns(pages_port)))


def test_attribution_survives_navigation_and_arrives_enriched(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    t = tid()
    funnel.open(page, "index.html", transaction_id=t, **ATTRIBUTION, **PRICES)
    # A link that navigates at once: the event must still arrive (keepalive / beacon).
    page.click("#get-quote")
    page.wait_for_url("**/form.html")
    # The second page has no parameters: attribution comes from the cookie / localStorage.
    page.wait_for_function(SDK_LOADED)
    page.click("#next-1")  # form_step: not an event of cmp_test, the relay refuses it (and that is fine)
    page.click("#next-2")
    page.click("#call-link")

    for event_id in ("quote_viewed", "call_clicked"):
        body = arrived(sandbox, event_id, t)[0]
        for key, value in ATTRIBUTION.items():
            assert body[key] == value, (event_id, key, body)
        assert body["sub5"] == "from-server"  # the campaign's server_fields win
        assert body["ip_address"] == "127.0.0.1"
        assert "Chrome" in body["user_agent"]
        assert body["conversion_date"].startswith(str(dt.date.today().year))
        assert "event_uuid" not in body
        # Only the campaign's server_fields set a price; nothing the page's URL carried.
        assert (body["cost"], body["cost_operation"]) == (1.25, "add"), body
        assert "min_price" not in body and "adSpend" not in body, body


def test_conversion_resolves_with_conversion_id(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    t = tid()
    page.goto(funnel.url("thanks.html", transaction_id=t, utm_source="bing"))
    page.wait_for_selector("#conversion-id:not([hidden])")
    shown = page.text_content("#conversion-id")
    body = arrived(sandbox, "sale_completed", t)[0]
    assert body["amount"] == 45.0 and body["utm_source"] == "bing"
    answer = sandbox.events(event_id="sale_completed", transaction_id=t)[0]["answer"]
    assert shown == answer["data"]["conversion_id"] and shown.startswith("conv_")


def test_data_pt_revenue_and_js_api_promise(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t)
    # data-pt-revenue on an element added by the page after load (delegation sees it).
    page.evaluate("""() => { const b = document.createElement('button'); b.id = 'buy';
        b.dataset.ptEvent = 'sale_completed'; b.dataset.ptRevenue = '19.99'; document.body.append(b); }""")
    page.click("#buy")
    body = arrived(sandbox, "sale_completed", t)[0]
    assert body["amount"] == 19.99
    # The JS API's Promise resolves with the relay's answer, refusals included.
    answer = page.evaluate("() => pingtree('conversion', 'sale_completed', 10, {cost: 99})")
    assert answer["type"] == "error" and "uplicate" in answer["message"]
    answer = page.evaluate("() => pingtree('event', 'no_such_event')")
    assert answer["status"] == 400 and answer["type"] == "error"


def test_calls_before_load_are_queued_by_the_stub(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    t = tid()
    # Block the SDK until the page has made its calls through the stub.
    gate: list[Any] = []
    page.route("**/sdk/cmp_test.js", lambda route: gate.append(route))
    page.goto(funnel.url("csp.html", transaction_id=t), wait_until="domcontentloaded")
    page.evaluate("() => { window.early = pingtree('conversion', 'sale_completed', 12.5); }")
    # page.evaluate lets Playwright dispatch the route callback (a plain sleep would not).
    wait_for(lambda: page.evaluate("1") and gate, message="the SDK request")
    assert page.evaluate("() => !!(window.pingtree.q && !window.pingtree.loaded)")
    gate[0].continue_()
    answer = page.evaluate("() => window.early")
    assert answer["status"] in (200, 202), answer
    assert arrived(sandbox, "sale_completed", t)[0]["amount"] == 12.5


def test_relay_down_then_back_each_event_arrives_once(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t, pt_debug="1")  # its trail counts the retries
    funnel.relay.stop()
    page.click("#csp-button")
    page.evaluate("() => { pingtree('event', 'call_clicked'); pingtree('event', 'call_clicked'); }")
    wait_for(lambda: page.evaluate(QUEUED) == 3, message="3 events queued in localStorage")
    # The SDK's debug trail (what the ?pt_debug=1 panel shows): one "retry" per failed attempt.
    wait_for(
        lambda: page.evaluate("() => pingtree.t.filter(e => e[0] == 'retry').length") >= 3,
        message="3 failed attempts logged",
    )
    page.reload()  # the relay is still down: not even the SDK loads; the queue waits in storage
    assert page.evaluate(QUEUED) == 3
    funnel.relay.start()
    page.reload()
    arrived(sandbox, "quote_viewed", t)
    arrived(sandbox, "call_clicked", t, count=2)
    wait_for(lambda: page.evaluate(QUEUED) == 0, message="the queue drained")
    page.reload()
    page.wait_for_function(SDK_LOADED)
    assert page.evaluate(QUEUED) == 0
    assert len(events(sandbox, "quote_viewed", t)) == 1
    assert len(events(sandbox, "call_clicked", t)) == 2


def test_two_tabs_do_not_send_the_same_event_twice(
    funnel: Funnel, sandbox: Any, context: Any, page: Any, console: list[str]
) -> None:
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t)
    funnel.relay.stop()
    page.click("#csp-button")
    wait_for(lambda: page.evaluate(QUEUED) == 1, message="the event queued")
    funnel.relay.start()
    other = context.new_page()
    other.goto(funnel.url("csp.html"))
    page.reload()
    arrived(sandbox, "quote_viewed", t)
    wait_for(lambda: page.evaluate(QUEUED) == 0, message="the queue drained")
    requests = [r for r in sandbox.requests() if t in str(r.get("body"))]
    assert len(requests) == 1, requests


def test_consent_gates_events(
    relay_factory: Any, pages: str, pages_port: int, sandbox: Any, page: Any, console: list[str]
) -> None:
    funnel = Funnel(pages, relay_factory(sdk_campaigns(pages_port, consent=True)))
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t, pt_debug="1")  # the panel says why events wait
    page.click("#csp-button")
    wait_for(lambda: page.evaluate(QUEUED) == 1, message="the event held in the queue")
    queue = page.locator('#pingtree-debug table[data-section="Waiting in this browser\'s queue"]')
    wait_for(
        lambda: queue.count() and "waiting for consent" in queue.inner_text(),
        message="the debug panel's reason",
    )
    assert events(sandbox, "quote_viewed", t) == []
    assert page.evaluate("() => pingtree('consent', true)") is True
    body = arrived(sandbox, "quote_viewed", t)[0]
    assert body["tcpa_consent"] == 1
    assert body["tcpa_consent_date"] == page.evaluate(
        "() => { const d = new Date(); return d.getFullYear() + '-' + String(d.getMonth() + 1).padStart(2, '0') + "
        "'-' + String(d.getDate()).padStart(2, '0'); }"
    )


def test_a_made_up_transaction_id_gives_way_to_pingtrees_click_cookie(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    # Both scripts on one landing page, ours first: no id anywhere yet, so the SDK makes one up.
    funnel.open(page, "csp.html")
    made = page.evaluate("() => pingtree('transactionId')")
    assert made
    # Pingtree's click script sets its cookie (pingtree_cookie's default name) a moment later...
    ours = tid()
    page.evaluate(f"() => {{ document.cookie = 'pt_transaction_id={ours}; path=/'; }}")
    # ...and from the next page on, events go with Pingtree's id, not the one Pingtree never heard of.
    funnel.open(page, "csp.html")
    assert page.evaluate("() => pingtree('transactionId')") == ours
    page.evaluate("() => pingtree('event', 'quote_viewed')")
    assert arrived(sandbox, "quote_viewed", ours)
    # An id that came from a landing URL is not made up: a click cookie never replaces it.
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t)
    funnel.open(page, "csp.html")
    assert page.evaluate("() => pingtree('transactionId')") == t


class ClickScriptLanding:
    """A landing page, served from the pages origin, with the campaign's tag as ``snippet`` prints
    it (``old_tag``: as tags pasted before it said ``defer`` did, ``async``), then ``inline``, then
    Pingtree's click script as a plain tag, which arrives only when the test calls
    :meth:`click_script_arrives` (it sets Pingtree's cookie)."""

    def __init__(
        self,
        funnel: Funnel,
        page: Any,
        written_page: Callable[[str, str], str],
        *,
        old_tag: bool = False,
        inline: str = "",
    ) -> None:
        tag = sdk.snippet_tag(load_config(funnel.relay.config_path), "cmp_test", base_url=funnel.relay.url)
        if old_tag:
            tag = tag.replace(f" {sdk.TAG_LOADING} ", " async ")
        html = (
            f"<!doctype html><html><head>{tag}{inline}"
            '<script src="/pt/pingtree.js"></script></head><body>landing</body></html>'
        )
        self.url = written_page(f"/landing{'-old-tag' if old_tag else ''}.html", html)
        self.held: list[Any] = []
        page.route("**/pt/pingtree.js", lambda route: self.held.append(route))

    def click_script_arrives(self, transaction_id: str) -> None:
        self.held[0].fulfill(
            body=f"document.cookie = 'pt_transaction_id={transaction_id}; path=/';",
            content_type="text/javascript",
        )


def test_the_pasted_tag_runs_after_pingtrees_click_script_wherever_it_is_pasted(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str], written_page: Callable[[str, str], str]
) -> None:
    # Our tag first, an event fired through the stub at once, and Pingtree's click script after
    # them, slow to arrive: the SDK must not run before it, or it makes an id up and the landing
    # page's event goes with one Pingtree never heard of.
    landing = ClickScriptLanding(
        funnel,
        page,
        written_page,
        inline="<script>pingtree('event', 'quote_viewed')</script>",
    )
    sdk_loaded: list[Any] = []
    page.on("requestfinished", lambda r: r.url.endswith("/sdk/cmp_test.js") and sdk_loaded.append(r))
    page.goto(landing.url, wait_until="commit")
    # page.evaluate lets Playwright dispatch the route and event callbacks (a plain sleep would not).
    wait_for(lambda: page.evaluate("1") and landing.held and sdk_loaded, message="both scripts requested")
    # Downloaded, and the page's task queue run once more: an async tag would have run by now.
    assert page.evaluate("() => !!(window.pingtree && window.pingtree.loaded)") is False
    ours = tid()
    landing.click_script_arrives(ours)
    page.wait_for_function(SDK_LOADED)
    assert page.evaluate("() => pingtree('transactionId')") == ours
    assert arrived(sandbox, "quote_viewed", ours)


def test_the_debug_panel_says_when_the_sdk_ran_before_pingtrees_click_script(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str], written_page: Callable[[str, str], str]
) -> None:
    # A tag pasted before the tag became defer: async, so it runs before Pingtree's plain tag that
    # is still downloading, and makes a transaction id up. The debug panel must say so, and why.
    landing = ClickScriptLanding(funnel, page, written_page, old_tag=True)
    page.goto(landing.url + "?pt_debug=1", wait_until="commit")
    wait_for(
        lambda: page.evaluate("() => !!(window.pingtree && window.pingtree.t)") and landing.held,
        message="the debug build running while Pingtree's script is still on its way",
    )
    landing.click_script_arrives(tid())
    notes = page.locator('#pingtree-debug table[data-section="Notes"]')
    wait_for(
        lambda: notes.count() and "made up by the SDK, though Pingtree's click script" in notes.inner_text(),
        message="the panel's note",
    )
    assert "/pt/pingtree.js" in notes.inner_text() and "defer" in notes.inner_text()


def test_hidden_fields_are_filled(funnel: Funnel, sandbox: Any, page: Any, console: list[str]) -> None:
    t = tid()
    funnel.open(page, "index.html", transaction_id=t, pid="src_demo", sub1="ad42", utm_source="google")
    funnel.open(page, "form.html")
    values = {
        name: page.input_value(f"input[name={name}]")
        for name in ("transaction_id", "pid", "sub1", "utm_source")
    }
    assert values == {"transaction_id": t, "pid": "src_demo", "sub1": "ad42", "utm_source": "google"}
    assert page.input_value("input[name=utm_campaign]") == ""  # nothing to fill it with
    page.click("#next-1")
    page.click("#next-2")
    page.click("#submit")
    page.wait_for_url("**/thanks.html")
    assert arrived(sandbox, "form_submitted", t)[0]["sub1"] == "ad42"


def test_csp_page_has_no_violations(funnel: Funnel, sandbox: Any, page: Any, console: list[str]) -> None:
    page.add_init_script("""window.__csp = [];
        document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));""")
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t)
    page.click("#csp-button")
    arrived(sandbox, "quote_viewed", t)
    assert page.evaluate("() => window.__csp") == []
    assert not [line for line in console if "Content Security Policy" in line]


def test_hostile_config_value_does_not_inject(
    relay_factory: Any, pages: str, pages_port: int, sandbox: Any, page: Any, console: list[str]
) -> None:
    # A CSS selector is the one free-text campaign value that reaches the script (check-config
    # refuses such a cookie_domain); the selector is invalid CSS too, which the SDK must survive.
    hostile = "</script><script>window.__pwned=1</script>\"'\u2028<!--"
    campaigns = (
        sdk_campaigns(pages_port) + f'[campaigns.cmp_test.sdk.selectors]\n{_toml(hostile)} = "quote_viewed"\n'
    )
    funnel = Funnel(pages, relay_factory(campaigns))
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t)
    page.click("#csp-button")
    arrived(sandbox, "quote_viewed", t)
    assert page.evaluate("() => window.__pwned") is None
    assert not [line for line in console if "pageerror" in line]


def test_sdk_etag_304_from_the_real_relay(funnel: Funnel) -> None:
    url = funnel.relay.url + "/sdk/cmp_test.js"
    first = httpx.get(url, headers={"Accept-Encoding": "gzip"})
    assert first.status_code == 200 and first.headers["content-encoding"] == "gzip"
    assert first.headers["access-control-allow-origin"] == "*"
    again = httpx.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert httpx.get(funnel.relay.url + "/sdk/cmp_nope.js").status_code == 404
