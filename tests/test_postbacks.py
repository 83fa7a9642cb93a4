"""Postbacks over real HTTP: a gunicorn relay process forwarding to a sandbox process.

Each test plays a call-tracking platform or a buyer: it fires the URL the platform would (GET with
its macros filled in, POST JSON, form-encoded POST) and checks what reached the sandbox (Pingtree),
what the relay stored, and what it counted.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.outbox.sqlite import SQLiteStore
from tests.conftest import Relay, Sandbox, campaigns_toml, make_relay, wait_for

RINGBA_TOKEN = "ringba-test-token-" + "r" * 32
BUYER_TOKEN = "buyer-test-token-" + "b" * 32
NETWORK_TOKEN = "network-test-token-" + "n" * 32
KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}

POSTBACKS = f"""
[campaigns.cmp_test.postbacks.ringba]
token = "{RINGBA_TOKEN}"
event = "sale_completed"
min_duration = 90
duration_param = "duration"
call_id_param = "call_id"
ignore_params = ["caller_state"]
[campaigns.cmp_test.postbacks.ringba.params]
tid = "transaction_id"
payout = "amount"
publisher = "sub1"

[campaigns.cmp_test.postbacks.buyer]
token = "{BUYER_TOKEN}"
event_param = "evt"
amount_format = "lenient"
[campaigns.cmp_test.postbacks.buyer.params]
txid = "transaction_id"
revenue = "amount"

[campaigns.cmp_test.postbacks.network]
token = "{NETWORK_TOKEN}"
event = "sale_completed"
global_org_id = "org_test"
[campaigns.cmp_test.postbacks.network.params]
tid = "transaction_id"
payout = "amount"
"""


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox, pages_port: int) -> Iterator[Relay]:
    """One relay (two workers) with three postback sources; each test uses fresh transaction ids."""
    server = make_relay(
        tmp_path_factory.mktemp("postbacks"),
        sandbox.url,
        pages_port,
        campaigns_toml(pages_port) + POSTBACKS,
        admin_token="admin-" + "a" * 32,
        inline_timeout=5.0,
    )  # a loaded machine must not turn a 200 into a 202
    server.start()
    yield server
    server.kill()


def txn() -> str:
    return f"txn_{uuid.uuid4()}"


def ringba(relay: Relay, query: str, **kw: Any) -> httpx.Response:
    """A GET the way Ringba fires it: the whole postback in the query string."""
    response = httpx.get(f"{relay.url}/postback/cmp_test/ringba?{query}", timeout=15, **kw)
    assert set(response.json()) == KEYS, response.text  # Pingtree's answer shape, refusals included
    return response


def stored(relay: Relay, transaction_id: str) -> list[Any]:
    store = SQLiteStore(str(relay.store_path))
    try:
        return store.find(transaction_id=transaction_id)
    finally:
        store.close()


def metric(relay: Relay, name: str, **labels: str) -> float:
    text = httpx.get(relay.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_get_with_macros_filled_is_delivered(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = ringba(
        relay,
        f"token={RINGBA_TOKEN}&tid={t}&payout=25.00&duration=184&call_id=CA11"
        "&publisher=pub_7&caller_state=TX&utm_source=radio",
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"]["conversion_id"].startswith("conv_")
    (event,) = sandbox.events(transaction_id=t)
    body = event["body"]
    assert body["event_id"] == "sale_completed" and body["amount"] == 25.0
    assert body["sub1"] == "pub_7" and body["utm_source"] == "radio"  # mapped, and kept under its name
    assert body["cost"] == 1.25 and body["sub5"] == "from-server"  # the campaign's server fields
    assert body["conversion_timezone"] == "EST" and re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", body["conversion_date"]
    )
    # Consumed or ignored, never forwarded; and no visitor IP or user agent from a server caller.
    for absent in (
        "token",
        "tid",
        "payout",
        "duration",
        "call_id",
        "caller_state",
        "publisher",
        "ip_address",
        "user_agent",
    ):
        assert absent not in body, absent


def test_token_in_a_header_post_json(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = httpx.post(
        f"{relay.url}/postback/cmp_test/buyer",
        headers={"X-Postback-Token": BUYER_TOKEN},
        json={"txid": t, "evt": "sale_completed", "revenue": 310.5, "sub2": "buyer-9"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    (event,) = sandbox.events(transaction_id=t)
    assert event["body"]["amount"] == 310.5 and event["body"]["sub2"] == "buyer-9"
    assert "evt" not in event["body"] and "txid" not in event["body"]


def test_form_encoded_post(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = httpx.post(
        f"{relay.url}/postback/cmp_test/ringba?token={RINGBA_TOKEN}",
        data={"tid": t, "payout": "12.50", "duration": "1:45"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    (event,) = sandbox.events(transaction_id=t)
    assert event["body"]["amount"] == 12.5


def test_lenient_amount_reads_currency_and_commas(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = httpx.get(
        f"{relay.url}/postback/cmp_test/buyer",
        params={"token": BUYER_TOKEN, "txid": t, "evt": "sale_completed", "revenue": "$1,234.50"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    assert sandbox.events(transaction_id=t)[0]["body"]["amount"] == 1234.5


def test_strict_amount_with_a_currency_symbol_is_refused(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = ringba(relay, f"token={RINGBA_TOKEN}&tid={t}&payout=%2425.00&duration=200")
    assert response.status_code == 400
    assert response.json()["invalidFields"] == {"payout": "expected a plain number like 1234.50"}
    assert 'amount_format = "lenient"' in response.json()["message"]
    assert stored(relay, t) == [] and sandbox.events(transaction_id=t) == []


def test_repeated_postback_counts_once(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    query = f"token={RINGBA_TOKEN}&tid={t}&payout=40&duration=300&call_id=CA-retry"
    answers = [ringba(relay, query) for _ in range(3)]  # the platform retries: same call, same URL
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    first = answers[0].json()["data"]
    assert {a.json()["data"]["event_uuid"] for a in answers} == {first["event_uuid"]}
    assert {a.json()["data"]["conversion_id"] for a in answers} == {first["conversion_id"]}
    assert len(sandbox.events(transaction_id=t)) == 1
    assert len([r for r in sandbox.requests() if (r["body"] or {}).get("transaction_id") == t]) == 1
    assert len(stored(relay, t)) == 1


def test_short_call_is_refused_and_counted(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    before = metric(relay, "pingtree_relay_postbacks_refused_total", source="ringba", reason="short_call")
    response = ringba(relay, f"token={RINGBA_TOKEN}&tid={t}&payout=25&duration=45")
    assert response.status_code == 400
    assert response.json()["message"] == "Call too short to be a conversion: 45 s, min_duration is 90 s"
    assert response.json()["invalidFields"] == {"duration": "at least 90 seconds"}
    assert stored(relay, t) == [] and sandbox.events(transaction_id=t) == []
    assert (
        metric(relay, "pingtree_relay_postbacks_refused_total", source="ringba", reason="short_call")
        == before + 1
    )


@pytest.mark.parametrize(
    ("query", "status", "reason"),
    [
        ("token=" + "x" * 40, 403, "token_invalid"),
        ("token=" + RINGBA_TOKEN[:-1], 403, "token_invalid"),
        ("token=" + BUYER_TOKEN, 403, "token_invalid"),  # another source's token
        ("", 401, "token_missing"),
    ],
)
def test_wrong_or_missing_token_is_refused_and_nothing_stored(
    relay: Relay,
    sandbox: Sandbox,
    query: str,
    status: int,
    reason: str,
) -> None:
    t = txn()
    before = metric(relay, "pingtree_relay_postbacks_refused_total", source="ringba", reason=reason)
    response = ringba(relay, f"{query}&tid={t}&payout=25&duration=200")
    assert response.status_code == status, response.text
    assert stored(relay, t) == [] and sandbox.requests() == []
    assert (
        metric(relay, "pingtree_relay_postbacks_refused_total", source="ringba", reason=reason) == before + 1
    )


def test_postback_during_an_outage_is_delivered_after_it(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    sandbox.fault(status=503)  # Pingtree down until cleared
    response = ringba(relay, f"token={RINGBA_TOKEN}&tid={t}&payout=60&duration=95&call_id=CA-outage")
    assert response.status_code == 202 and response.json()["type"] == "queued", response.text
    wait_for(lambda: len(sandbox.requests()) >= 2, message="the relay retrying through the outage")
    assert sandbox.events(transaction_id=t) == []
    sandbox.clear_faults()
    (event,) = wait_for(lambda: sandbox.events(transaction_id=t), message="delivery after the outage")
    assert event["body"]["amount"] == 60.0
    wait_for(lambda: [r.state for r in stored(relay, t)] == ["delivered"], message="the record delivered")
    # The platform's retry during the outage, answered later: still one event.
    assert (
        ringba(relay, f"token={RINGBA_TOKEN}&tid={t}&payout=60&duration=95&call_id=CA-outage").status_code
        == 200
    )
    assert len(sandbox.events(transaction_id=t)) == 1


def test_through_the_global_api(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    # The lead exists at Pingtree once the visitor's page fired an event for it.
    assert relay.post({"event_id": "form_submitted", "transaction_id": t}).status_code == 200
    response = httpx.get(
        f"{relay.url}/postback/cmp_test/network",
        params={"token": NETWORK_TOKEN, "tid": t, "payout": "75"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"]["cid"] == "cmp_test"  # Pingtree found the campaign from the lead
    request = [r for r in sandbox.requests() if r["path"].startswith("/api/event/global/")]
    assert [r["path"] for r in request] == ["/api/event/global/org_test"]
    assert "_pt_global_org" not in request[0]["body"] and "cid" not in request[0]["body"]
    (event,) = sandbox.events(transaction_id=t, event_id="sale_completed")
    assert event["cid"] == "cmp_test" and event["body"]["amount"] == 75.0


def test_global_api_for_an_unknown_lead_says_so(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = httpx.get(
        f"{relay.url}/postback/cmp_test/network",
        params={"token": NETWORK_TOKEN, "tid": t, "payout": "75"},
        timeout=15,
    )
    assert response.status_code == 404 and response.json()["message"] == "Lead Not Found", response.text
    assert [r.state for r in stored(relay, t)] == ["dead"]  # kept as a dead letter, re-queueable


@pytest.mark.parametrize(
    ("path", "query", "status", "message", "fields"),
    [
        ("cmp_test/nope", f"token={RINGBA_TOKEN}", 404, "Postback source not found", {}),
        ("cmp_nope/ringba", f"token={RINGBA_TOKEN}", 404, "Campaign not found", {}),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&payout=25&duration=200",
            400,
            "transaction_id is required: no tid parameter in the postback",
            {"tid": "required (the lead's transaction_id)"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=[tag:transaction_id]&payout=25&duration=200",
            400,
            "Unfilled macros: tid",
            {"tid": "the macro [tag:transaction_id] was not filled in by the platform"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=T&payout=25",
            400,
            "call duration is required: no duration parameter in the postback",
            {"duration": "required (the call duration)"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=T&payout=25&duration=long",
            400,
            "Invalid duration: expected the call length in seconds",
            {"duration": "expected a number of seconds (or M:SS)"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=T&tid=U&payout=25&duration=200",
            400,
            "Parameter tid given more than once",
            {"tid": "given more than once"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=T&payout=25&duration=200&cost=9",
            400,
            "Invalid fields: cost",
            {"cost": "set by the server only"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=T&payout=25&duration=200&callerid=555",
            400,
            "Invalid fields: callerid",
            {"callerid": "unknown field"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=T&duration=200",
            400,
            "amount is required for conversion events",
            {"amount": "required for conversion events"},
        ),
        (
            "cmp_test/buyer",
            f"token={BUYER_TOKEN}&txid=T&evt=nope",
            400,
            "Invalid event_id for this campaign",
            {"event_id": "not configured"},
        ),
        (
            "cmp_test/ringba",
            f"token={RINGBA_TOKEN}&tid=%ff%fe&payout=25&duration=200",
            400,
            "Invalid query string: tid is not UTF-8 text",
            {"tid": "not UTF-8 text"},
        ),
    ],
)
def test_bad_postbacks_get_a_clear_answer(
    relay: Relay,
    sandbox: Sandbox,
    path: str,
    query: str,
    status: int,
    message: str,
    fields: dict[str, str],
) -> None:
    response = httpx.get(f"{relay.url}/postback/{path}?{query}", timeout=15)
    body = response.json()
    assert (response.status_code, body["message"]) == (status, message), response.text
    assert {**body["missingFields"], **body["invalidFields"]} == fields
    assert sandbox.requests() == []


def test_head_does_not_fire(relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = httpx.head(
        f"{relay.url}/postback/cmp_test/ringba?token={RINGBA_TOKEN}&tid={t}&payout=5&duration=99"
    )
    assert response.status_code == 405
    assert stored(relay, t) == []


def test_dashboard_shows_postbacks_per_source_with_refusals(relay: Relay, sandbox: Sandbox) -> None:
    ringba(relay, f"token={RINGBA_TOKEN}&tid={txn()}&payout=25&duration=10")  # one refusal at least
    ringba(relay, f"token={RINGBA_TOKEN}&tid={txn()}&payout=25&duration=100")  # one accepted at least
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        page = client.get("/admin/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        client.post("/admin/login", data={"token": "admin-" + "a" * 32, "csrf_token": csrf})
        html = client.get("/admin/postbacks").text
    section = html[html.index('id="postback-cmp_test-ringba"') : html.index('id="postback-cmp_test-buyer"')]
    assert f"{relay.url}/postback/cmp_test/ringba" in section
    refused = int(re.search(r'class="pb-refused">(\d+)<', section).group(1))  # type: ignore[union-attr]
    accepted = int(re.search(r'class="pb-accepted">(\d+)<', section).group(1))  # type: ignore[union-attr]
    assert refused >= 1 and accepted >= 1
    assert "<code>short_call</code>" in section
    # Summed over both workers, like /metrics.
    assert refused == metric(relay, "pingtree_relay_postbacks_total", source="ringba", outcome="refused")
    assert RINGBA_TOKEN not in html  # the page shows where to send, never the credential
