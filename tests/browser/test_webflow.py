"""The marketer's side, on a Webflow-like site (tests/browser/webflow/): Webflow's export markup, a
native Webflow form (``w-form``, ``w-form-done``/``w-form-fail``) and a webflow.js that intercepts
submit as Webflow's does, with the tag pasted as ``pingtree-relay snippet`` prints it.

Hidden attribution fields without an Embed, form events on a real submit only, a strict CSP built
from ``snippet --csp`` (with and without the inline stub), ad click ids captured and mapped to
``external_clickid``, staging origins kept away from Pingtree, and the ``?pt_debug=1`` panel.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from server.attribution import CLICK_IDS
from tests.browser.conftest import SDK_LOADED
from tests.browser.webflow_site import WebflowSite, site, site_campaigns  # noqa: F401 - fixture
from tests.conftest import wait_for

pytestmark = pytest.mark.browser

SUBMISSIONS = "() => window.__webflowSubmissions"


def tid() -> str:
    return "txn_" + uuid.uuid4().hex[:12]


def arrived(sandbox: Any, event_id: str, transaction_id: str, count: int = 1) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        bodies = [e["body"] for e in sandbox.events(event_id=event_id, transaction_id=transaction_id)]
        return bodies if len(bodies) >= count else None

    return wait_for(found, message=f"{count} x {event_id} for {transaction_id}")  # type: ignore[no-any-return]


def open_site(page: Any, site: WebflowSite, name: str = "index.html", **params: str) -> None:  # noqa: F811
    page.goto(site.url(name, **params))
    page.wait_for_function(SDK_LOADED)


@pytest.fixture
def tagged(relay_factory: Any, pages_port: int, site: WebflowSite) -> Any:  # noqa: F811
    """The site with the tag pasted, its origin allowed, add_hidden_fields on."""
    relay = relay_factory(site_campaigns(pages_port, site, sdk="add_hidden_fields = true\n"))
    site.paste(relay)
    return relay


def fill_form(page: Any) -> None:
    page.fill("#name", "Jane Doe")
    page.fill("#email", "jane@example.com")


# --- forms --------------------------------------------------------------------------------------


def test_hidden_fields_are_added_to_a_native_webflow_form(
    tagged: Any,
    site: WebflowSite,
    sandbox: Any,  # noqa: F811
    page: Any,
    console: list[str],
) -> None:
    t = tid()
    open_site(page, site, transaction_id=t, utm_source="google", sub1="ad42", gclid="Cj0KCQ")
    # One hidden input per attribution value, by Pingtree's names, in the form webflow.js serializes.
    names = page.eval_on_selector_all("#email-form input[type=hidden]", "els => els.map(e => e.name).sort()")
    assert names == ["gclid", "sub1", "transaction_id", "utm_source"]
    fill_form(page)
    page.click("#submit")
    page.wait_for_selector(".w-form-done", state="visible")  # webflow.js handled the submit as usual
    [submission] = page.evaluate(SUBMISSIONS)
    assert submission["name"] == "Email Form"
    assert submission["fields"] == {
        "Name": "Jane Doe",
        "Email": "jane@example.com",
        "transaction_id": t,
        "utm_source": "google",
        "sub1": "ad42",
        "gclid": "Cj0KCQ",
    }
    body = arrived(sandbox, "form_submitted", t)[0]
    assert body["utm_source"] == "google" and body["gclid"] == "Cj0KCQ"
    assert not [line for line in console if "pageerror" in line], console


def test_a_field_the_form_has_is_not_added_twice(
    tagged: Any,
    site: WebflowSite,
    page: Any,  # noqa: F811
    console: list[str],
) -> None:
    page.add_init_script("""document.addEventListener('DOMContentLoaded', () => {
        const i = document.createElement('input'); i.type = 'text'; i.name = 'sub1'; i.id = 'own-sub1';
        document.querySelector('#email-form').prepend(i); }, { capture: true });""")
    open_site(page, site, transaction_id=tid(), sub1="ad42", utm_medium="cpc")
    assert page.eval_on_selector_all("#email-form [name=sub1]", "els => els.length") == 1
    assert page.eval_on_selector_all(
        "#email-form input[type=hidden]", "els => els.map(e => e.name).sort()"
    ) == ["transaction_id", "utm_medium"]


def test_without_add_hidden_fields_no_input_is_added(
    relay_factory: Any,
    pages_port: int,
    site: WebflowSite,  # noqa: F811
    page: Any,
    console: list[str],
) -> None:
    site.paste(relay_factory(site_campaigns(pages_port, site)))
    open_site(page, site, transaction_id=tid(), sub1="ad42")
    assert page.eval_on_selector_all("#email-form input[type=hidden]", "els => els.length") == 0


@pytest.mark.parametrize("marked", ["form", "submit button"])
def test_form_event_fires_on_a_real_submit_only(
    tagged: Any,
    site: WebflowSite,
    sandbox: Any,
    page: Any,  # noqa: F811
    console: list[str],
    marked: str,
) -> None:
    t = tid()
    open_site(page, site, "index.html" if marked == "form" else "signup.html", transaction_id=t)
    # Empty required fields: the browser's validation stops the submit, so no event.
    page.click("#submit")
    assert page.evaluate("() => document.querySelector('form').checkValidity()") is False
    page.click("#cta")  # an event that does fire, as a marker that the SDK's queue has moved past
    arrived(sandbox, "quote_viewed", t)
    assert sandbox.events(event_id="form_submitted", transaction_id=t) == []
    assert page.evaluate(SUBMISSIONS) == []
    # Valid: the submit goes through (webflow.js takes it over) and the event fires, once.
    fill_form(page)
    page.click("#submit")
    page.wait_for_selector(".w-form-done", state="visible")
    arrived(sandbox, "form_submitted", t)
    assert len(page.evaluate(SUBMISSIONS)) == 1
    wait_for(
        lambda: page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('pt:')).length") == 0,
        message="the queue to empty",
    )
    assert len(sandbox.requests()) == 2  # quote_viewed and form_submitted: no click event on the button


# --- strict CSP, no file of your own --------------------------------------------------------------


@pytest.mark.parametrize("stub", [True, False], ids=["inline stub by hash", "no stub"])
def test_strict_csp_from_snippet_csp(
    relay_factory: Any,
    pages_port: int,
    site: WebflowSite,
    sandbox: Any,  # noqa: F811
    page: Any,
    console: list[str],
    stub: bool,
) -> None:
    site.paste(relay_factory(site_campaigns(pages_port, site)), stub=stub, strict_csp=True)
    t = tid()
    page.goto(site.url("index.html", transaction_id=t, fbclid="fb.1"))
    if stub:  # calls made before the script arrives wait in the stub (allowed by its hash)
        page.evaluate("() => { window.early = pingtree('event', 'quote_viewed'); }")
    page.wait_for_function(SDK_LOADED)
    if not stub:
        page.click("#cta")
    assert arrived(sandbox, "quote_viewed", t)[0]["fbclid"] == "fb.1"
    assert not [line for line in console if "Content Security Policy" in line], console


# --- ad click ids -------------------------------------------------------------------------------


@pytest.fixture
def plain(relay_factory: Any, pages_port: int, site: WebflowSite) -> Any:  # noqa: F811
    relay = relay_factory(site_campaigns(pages_port, site))
    site.paste(relay)
    return relay


@pytest.mark.parametrize("click_id", CLICK_IDS)
def test_every_click_id_is_captured_and_becomes_external_clickid(
    plain: Any,
    site: WebflowSite,
    sandbox: Any,  # noqa: F811
    page: Any,
    console: list[str],
    click_id: str,
) -> None:
    t = tid()
    open_site(page, site, transaction_id=t, **{click_id: f"{click_id}-abc"})
    # It is kept with the attribution: the next page (no parameters) still sends it.
    page.click("a[href='signup.html']")
    page.wait_for_url("**/signup.html")
    page.wait_for_function(SDK_LOADED)
    page.click("#cta")
    body = arrived(sandbox, "quote_viewed", t)[0]
    assert body[click_id] == f"{click_id}-abc"
    assert body["external_clickid"] == f"{click_id}-abc"


def test_first_click_id_in_order_wins_and_the_url_external_clickid_wins_over_all(
    plain: Any,
    site: WebflowSite,
    sandbox: Any,
    page: Any,
    console: list[str],  # noqa: F811
) -> None:
    t = tid()
    open_site(page, site, transaction_id=t, fbclid="fb", msclkid="ms", wbraid="wb")
    page.click("#cta")
    body = arrived(sandbox, "quote_viewed", t)[0]
    assert (body["external_clickid"], body["fbclid"], body["msclkid"]) == ("wb", "fb", "ms")
    t2 = tid()
    page.context.clear_cookies()
    page.evaluate("() => localStorage.clear()")
    open_site(page, site, transaction_id=t2, gclid="g", external_clickid="mine")
    page.click("#cta")
    body = arrived(sandbox, "quote_viewed", t2)[0]
    assert (body["external_clickid"], body["gclid"]) == ("mine", "g")


@pytest.mark.parametrize(("order", "expected"), [('["ttclid", "gclid"]', "tt"), ("[]", None)])
def test_external_clickid_from_changes_the_order_or_turns_it_off(
    relay_factory: Any,
    pages_port: int,
    site: WebflowSite,
    sandbox: Any,
    page: Any,  # noqa: F811
    console: list[str],
    order: str,
    expected: str | None,
) -> None:
    site.paste(relay_factory(site_campaigns(pages_port, site, campaign=f"external_clickid_from = {order}\n")))
    t = tid()
    open_site(page, site, transaction_id=t, gclid="g", ttclid="tt")
    page.click("#cta")
    body = arrived(sandbox, "quote_viewed", t)[0]
    assert body.get("external_clickid") == expected and body["gclid"] == "g" and body["ttclid"] == "tt"


# --- staging origins ----------------------------------------------------------------------------


def test_staging_origin_is_answered_as_test_and_never_reaches_pingtree(
    relay_factory: Any,
    pages_port: int,
    site: WebflowSite,
    sandbox: Any,
    page: Any,  # noqa: F811
    console: list[str],
) -> None:
    site.paste(relay_factory(site_campaigns(pages_port, site, staging=True)))
    t = tid()
    open_site(page, site, transaction_id=t)
    answer = page.evaluate("() => pingtree('conversion', 'sale_completed', 45)")
    assert answer["status"] == 200 and answer["data"]["test"] is True, answer
    assert answer["data"]["conversion_id"].startswith("conv_test_")
    fill_form(page)
    page.click("#submit")  # webflow.js and the SDK behave as on the live site
    page.wait_for_selector(".w-form-done", state="visible")
    wait_for(
        lambda: page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('pt:')).length") == 0,
        message="the relay to answer the form event",
    )
    assert sandbox.requests() == []


# --- the debug panel ----------------------------------------------------------------------------


def test_debug_panel_shows_attribution_events_answers_and_queue(
    plain: Any,
    site: WebflowSite,
    sandbox: Any,
    page: Any,
    console: list[str],  # noqa: F811
) -> None:
    t = tid()
    # An earlier page set the cookie; this one comes with ?pt_debug=1 and a first-touch utm_content.
    open_site(page, site, transaction_id=t, utm_source="google")
    page.goto(site.url("signup.html", pt_debug="1"))
    page.wait_for_selector("#pingtree-debug")
    page.evaluate("() => pingtree('set', { sub2: 'from-code' })")
    page.evaluate("() => pingtree('event', 'quote_viewed')")
    page.evaluate("() => pingtree('event', 'no_such_event')")
    panel = page.locator("#pingtree-debug")
    attribution = panel.locator("table[data-section='Attribution']")
    wait_for(lambda: "page code" in attribution.inner_text(), message="the panel to show pingtree('set')")
    rows = {r.split("\t")[0]: r.split("\t")[1:] for r in attribution.inner_text().splitlines()}
    assert rows["transaction_id"] == [t, "cookie (an earlier page or visit)"]
    assert rows["utm_source"] == ["google", "cookie (an earlier page or visit)"]
    assert rows["sub2"] == ["from-code", "page code: pingtree('set')"]
    events = panel.locator('table[data-section="Events and the relay\'s answers"]')
    wait_for(
        lambda: "refused (400)" in events.inner_text() and "accepted" in events.inner_text(),
        message="both answers in the panel",
    )
    assert "Invalid event_id for this campaign" in events.inner_text()
    # Offline: a new event waits in the queue, and the panel says why.
    page.context.set_offline(True)
    page.evaluate("() => { pingtree('event', 'call_clicked'); }")
    queue = panel.locator('table[data-section="Waiting in this browser\'s queue"]')
    wait_for(
        lambda: queue.count() and "held: offline" in queue.inner_text(),
        message="the queued event in the panel",
    )
    page.context.set_offline(False)
    assert any("[pingtree]" in line for line in console)  # the panel also writes the SDK's log to the console


def test_debug_panel_only_in_debug_mode(plain: Any, site: WebflowSite, page: Any, console: list[str]) -> None:  # noqa: F811
    loaded: list[str] = []
    page.on("request", lambda r: loaded.append(r.url) if "debug.js" in r.url else None)
    open_site(page, site, transaction_id=tid())
    page.evaluate("() => pingtree('event', 'quote_viewed')")
    # Neither the debug build nor the panel: a visitor downloads no debug code.
    assert page.locator("#pingtree-debug").count() == 0 and loaded == []


def test_pingtree_debug_turns_the_debug_build_on_for_the_next_pages_and_off_again(
    plain: Any,
    site: WebflowSite,
    sandbox: Any,
    page: Any,
    console: list[str],  # noqa: F811
) -> None:
    loaded: list[str] = []
    page.on("request", lambda r: loaded.append(r.url) if "debug.js" in r.url else None)
    t = tid()
    open_site(page, site, transaction_id=t)
    assert page.evaluate("() => pingtree('debug')") is True
    assert loaded == []  # remembered for the next page, not loaded into this one
    page.reload()
    page.wait_for_selector("#pingtree-debug")
    assert [url.rsplit("/", 1)[-1] for url in loaded] == ["debug.js", "pingtree.debug.js"]
    # The debug build does the work in the normal one's place: events go out, once, with the trail.
    page.evaluate("() => pingtree('event', 'quote_viewed')")
    assert len(arrived(sandbox, "quote_viewed", t)) == 1
    wait_for(
        lambda: page.evaluate("() => pingtree.t.some(e => e[0] == 'answer')"),
        message="the answer in the debug trail",
    )
    assert page.evaluate("() => pingtree('debug', false)") is False
    loaded.clear()
    page.reload()
    page.wait_for_function(SDK_LOADED)
    assert page.locator("#pingtree-debug").count() == 0 and loaded == []
    assert page.evaluate("() => pingtree.t") is None


def test_debug_panel_under_the_demo_strict_csp(
    relay_factory: Any, pages: str, pages_port: int, sandbox: Any, page: Any, console: list[str]
) -> None:
    from tests.browser.conftest import Funnel, sdk_campaigns

    funnel = Funnel(pages, relay_factory(sdk_campaigns(pages_port)))
    funnel.open(page, "csp.html", transaction_id=tid(), pt_debug="1")
    page.click("#csp-button")
    panel = page.locator("#pingtree-debug")
    # Its verdict on the answer: "accepted" (tried inline) or "queued by the relay" (202: the relay
    # skips the inline attempt while short of CPU, as a loaded CI machine makes it; seen in CI).
    wait_for(
        lambda: panel.count() and any(v in panel.inner_text() for v in ("accepted", "queued by the relay")),
        message="the panel with the answer",
    )
    assert (
        panel.evaluate("el => getComputedStyle(el).position") == "fixed"
    )  # its styles applied under the CSP
    assert not [line for line in console if "Content Security Policy" in line], console
