"""Events the SDK must not lose, in a real Chromium: each test is one way the SDK used to lose them.

- A landing value the relay refuses (a control character, over 255 characters, a transaction id
  over 128) used to be kept, then sent on every later event: each one refused with a 400, for good.
- Attribution kept under the same cookie by another campaign (or an ``extra_params`` entry since
  removed) used to be sent too: the relay refuses an unknown field, so every event was refused.
- Without Web Locks, the flush that releases a held event could run in the very millisecond the
  event was stamped, and leave it unsent.
- Fields JSON cannot hold made the JS API's Promise reject (it never rejects).
- Without localStorage, one 5xx lost the event: the retry only looked in storage.
- With a ``public_url`` that has a path, debug mode loaded the debug build from the origin's root.

Each test fails without its fix (checked by reverting it once); on failure the browser console and
what the sandbox received are printed (tests/browser/conftest.py).
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.browser.conftest import SDK_LOADED, Funnel, sdk_campaigns
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.browser

QUEUED = "() => Object.keys(localStorage).filter(k => k.startsWith('pt:cmp_test:')).length"
LONG_ID = "t" * 129  # the relay's limit for a transaction id is 128 (server/fields.py, MAX_ID)


def tid() -> str:
    return "txn_" + uuid.uuid4().hex[:12]


def arrived(sandbox: Any, event_id: str, transaction_id: str) -> dict[str, Any]:
    found = wait_for(
        lambda: sandbox.events(event_id=event_id, transaction_id=transaction_id),
        timeout=15,
        message=f"{event_id} for {transaction_id}",
    )
    assert len(found) == 1, found
    return found[0]["body"]


@pytest.fixture
def funnel(relay_factory: Any, pages: str, pages_port: int) -> Funnel:
    return Funnel(pages, relay_factory(sdk_campaigns(pages_port)))


@pytest.mark.parametrize(
    "bad",
    [
        {"utm_term": "car\ninsurance"},  # a control character (tab is fine, below)
        {"utm_content": "x" * 256},
        {"transaction_id": LONG_ID},
    ],
    ids=["control_character", "over_255", "transaction_id_over_128"],
)
def test_a_value_the_relay_refuses_is_not_kept(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str], bad: dict[str, str]
) -> None:
    t = tid()
    landing = {"transaction_id": t, "utm_source": "google", "utm_medium": "a\tb", **bad}
    funnel.open(page, "csp.html", **landing)
    if bad.get("transaction_id"):
        # Refused: the id comes from further down the chain (here a new one, generate_transaction_id).
        t = page.evaluate("() => pingtree('transactionId')")
        assert t and t != LONG_ID
    funnel.open(page, "csp.html")  # a later page: only what was kept
    answer = page.evaluate("() => pingtree('event', 'quote_viewed')")
    assert answer["status"] == 200, answer
    body = arrived(sandbox, "quote_viewed", t)
    assert (body["utm_source"], body["utm_medium"]) == ("google", "a\tb")
    for name in bad:
        if name != "transaction_id":
            assert name not in body, body


def test_a_bad_value_kept_by_an_earlier_visit_is_dropped(
    funnel: Funnel, sandbox: Any, context: Any, page: Any, console: list[str], pages: str
) -> None:
    # What an earlier SDK kept, or another campaign on the same site (cookie_name is shared):
    # a field this campaign does not capture, and a value the relay refuses.
    t = tid()
    kept = {"transaction_id": t, "utm_source": "google", "promo": "SPRING", "utm_term": "car\ninsurance"}
    context.add_cookies([{"name": "pt_attr", "value": quote(json.dumps(kept), safe=""), "url": pages}])
    funnel.open(page, "csp.html")
    answer = page.evaluate("() => pingtree('event', 'quote_viewed')")
    assert answer["status"] == 200, answer
    body = arrived(sandbox, "quote_viewed", t)
    assert body["utm_source"] == "google"
    assert "promo" not in body and "utm_term" not in body, body


def test_attribution_of_another_campaign_is_not_sent(
    relay_factory: Any, pages: str, pages_port: int, sandbox: Any, page: Any, console: list[str]
) -> None:
    # Campaign X captures ?promo= (sdk.extra_params); campaign Y, on the same site, does not. Both
    # use the default cookie_name. Here X and Y are cmp_test with and without it, behind two relays.
    with_promo = sdk_campaigns(pages_port, extra_params=["promo"]).replace(
        'extra_fields = ["quote_id"]', 'extra_fields = ["quote_id", "promo"]', 1
    )
    x = Funnel(pages, relay_factory(with_promo))
    y = Funnel(pages, relay_factory(sdk_campaigns(pages_port)))
    t = tid()
    x.open(page, "csp.html", transaction_id=t, utm_source="google", promo="SPRING")
    assert page.evaluate("() => pingtree('set', {})")["promo"] == "SPRING"  # X keeps it
    y.open(page, "csp.html")
    answer = page.evaluate("() => pingtree('event', 'quote_viewed')")
    assert answer["status"] == 200, answer
    body = arrived(sandbox, "quote_viewed", t)
    assert body["utm_source"] == "google" and "promo" not in body, body


def test_a_held_event_goes_with_the_flush_that_releases_it(
    relay_factory: Any, pages: str, pages_port: int, sandbox: Any, page: Any, console: list[str]
) -> None:
    # A plain-http page has no Web Locks: flush() then runs in the same task as the call that
    # releases the event. The same millisecond is made certain here by holding the clock still.
    funnel = Funnel(pages, relay_factory(sdk_campaigns(pages_port, generate_transaction_id=False)))
    page.add_init_script("delete Navigator.prototype.locks;")
    funnel.open(page, "csp.html")
    assert page.evaluate("() => navigator.locks") is None
    t = tid()
    page.evaluate(
        """t => { const now = Date.now, frozen = now(); Date.now = () => frozen;
        try { pingtree('event', 'quote_viewed'); pingtree('transactionId', t); } finally { Date.now = now; } }""",
        t,
    )
    arrived(sandbox, "quote_viewed", t)
    wait_for(lambda: page.evaluate(QUEUED) == 0, message="the queue drained")


def test_fields_json_cannot_hold_resolve_with_an_error(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t)
    answers = page.evaluate(
        """async () => { const loop = {}; loop.self = loop;
        return [await pingtree('event', 'quote_viewed', {quote_id: 1n}),
                await pingtree('event', 'quote_viewed', {quote_id: loop}),
                await pingtree('conversion', 'sale_completed', 10n),
                await pingtree('no_such_call')]; }"""
    )
    for answer in answers:
        assert answer == {"status": 0, "type": "error", "message": "invalid call"}, answers
    assert page.evaluate(QUEUED) == 0  # nothing half-queued
    answer = page.evaluate("() => pingtree('event', 'quote_viewed', {quote_id: 'q1'})")  # the SDK still works
    assert answer["status"] == 200, answer
    assert arrived(sandbox, "quote_viewed", t)["quote_id"] == "q1"


def test_without_local_storage_a_5xx_is_retried_from_the_page(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str]
) -> None:
    # Storage denied (a sandboxed frame, site data blocked): reading localStorage throws.
    page.add_init_script(
        "Object.defineProperty(window, 'localStorage', { get() { throw new DOMException('denied', 'SecurityError'); } });"
    )
    posts: list[str] = []

    def answer(route: Any) -> None:
        posts.append(route.request.post_data or "")
        if len(posts) == 1:
            route.fulfill(
                status=503,
                headers={"Content-Type": "application/json", "Access-Control-Allow-Origin": "*"},
                body=json.dumps({"status": 503, "type": "error", "message": "Service unavailable"}),
            )
        else:
            route.continue_()

    page.route("**/api/event/cmp_test", answer)
    t = tid()
    funnel.open(page, "csp.html", transaction_id=t)
    page.evaluate("() => { window.answer = pingtree('event', 'quote_viewed'); }")
    # page.evaluate lets Playwright dispatch the route callback; the first attempt gets the 503.
    wait_for(lambda: page.evaluate("1") and len(posts) >= 2, timeout=15, message="a retry after the 503")
    assert page.evaluate("() => window.answer")["status"] == 200
    arrived(sandbox, "quote_viewed", t)
    assert len({json.loads(p)["event_uuid"] for p in posts}) == 1


def test_debug_mode_loads_from_a_public_url_with_a_path(
    relay_factory: Any, pages: str, pages_port: int, sandbox: Any, page: Any, console: list[str]
) -> None:
    # The relay is reachable at its public_url only, under /relay (a reverse proxy that forwards that
    # path and nothing else; played here by the page's own request routing).
    port = free_port()
    relay = relay_factory(sdk_campaigns(pages_port), port=port, public_url=f"http://127.0.0.1:{port}/relay")

    def proxy(route: Any) -> None:
        path = urlsplit(route.request.url).path
        if not path.startswith("/relay/"):
            route.fulfill(status=404, body="not behind the proxy")
            return
        upstream = httpx.request(
            route.request.method,
            relay.url + route.request.url.split("/relay", 1)[1],
            headers={k: v for k, v in route.request.all_headers().items() if k in ("origin", "content-type")},
            content=route.request.post_data_buffer,
            timeout=15,
        )
        headers = {
            k: v
            for k, v in upstream.headers.items()
            if k.lower() not in ("content-encoding", "content-length")
        }
        route.fulfill(status=upstream.status_code, headers=headers, body=upstream.content)

    page.route(f"http://127.0.0.1:{port}/**", proxy)
    t = tid()
    page.goto(
        f"{pages}/index.html?relay=http://127.0.0.1:{port}/relay&cid=cmp_test&transaction_id={t}&pt_debug=1"
    )
    page.wait_for_function(SDK_LOADED, timeout=15000)
    assert page.evaluate("() => Array.isArray(pingtree.t)")  # the debug build runs (its trail)
    page.wait_for_selector("#pingtree-debug", timeout=15000)  # and its panel loaded
    answer = page.evaluate("() => pingtree('event', 'quote_viewed')")  # events go through the path too
    assert answer["status"] == 200, answer
    arrived(sandbox, "quote_viewed", t)


# Plausible's form of the stub: it queues `arguments` and returns nothing.
PLAIN_STUB = "() => { window.pingtree = function () { (pingtree.q = pingtree.q || []).push(arguments); }; }"


@pytest.mark.parametrize("stub", ["promise", "plain"])
def test_a_kept_reference_to_the_stub_still_sends_after_the_script_loads(
    funnel: Funnel, sandbox: Any, page: Any, console: list[str], stub: str
) -> None:
    # `const pt = window.pingtree` in a page's code (a bundle, a tag manager) keeps the stub; both
    # stubs push to `window.pingtree.q` at call time, which after load is the SDK's: that push used
    # to fill an array nobody read, and every later event through `pt` was lost.
    t = tid()
    gate: list[Any] = []
    page.route("**/sdk/cmp_test.js", lambda route: gate.append(route))
    page.goto(funnel.url("csp.html", transaction_id=t), wait_until="domcontentloaded")
    if stub == "plain":
        page.evaluate(PLAIN_STUB)
    page.evaluate("() => { window.pt = window.pingtree; pt('event', 'quote_viewed'); }")
    wait_for(lambda: page.evaluate("1") and gate, message="the SDK request")
    gate[0].continue_()
    page.wait_for_function(SDK_LOADED)
    assert page.evaluate("() => window.pt !== window.pingtree")  # the page still holds the stub
    page.evaluate("() => { window.late = window.pt('conversion', 'sale_completed', 7); }")
    if stub == "promise":
        # A deadline, not a wait: unanswered, the stub's Promise would never settle.
        answer = page.evaluate(
            "() => Promise.race([window.late, new Promise(r => setTimeout(r, 15000, 'never answered'))])"
        )
        assert answer["status"] in (200, 202), answer
    assert arrived(sandbox, "sale_completed", t)["amount"] == 7
    assert arrived(sandbox, "quote_viewed", t)  # the call made before load, as before
