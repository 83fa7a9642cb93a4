"""The relay's endpoint over real HTTP: a gunicorn relay process forwarding to a sandbox process."""

from __future__ import annotations

import calendar
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Relay, Sandbox, campaigns_toml, make_relay, wait_for

ORIGIN = "https://www.example.com"
KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}


@pytest.fixture(scope="module")
def shared_relay(
    tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox, pages_port: int
) -> Iterator[Relay]:
    """One relay for the read-mostly tests of this module (each test uses fresh transaction ids)."""
    extra = campaigns_toml(pages_port) + "\n[campaigns.cmp_test.events.relay_only]\ninline = true\n"
    relay = make_relay(tmp_path_factory.mktemp("relay"), sandbox.url, pages_port, extra).start()
    yield relay
    relay.kill()


def txn() -> str:
    return f"txn_{uuid.uuid4()}"


def post(relay: Relay, body: Any, **kw: Any) -> httpx.Response:
    response = relay.post(body, **kw)
    assert set(response.json()) == KEYS, response.text  # every answer has Pingtree's shape
    return response


def test_healthz(shared_relay: Relay) -> None:
    assert httpx.get(shared_relay.url + "/healthz").json() == {"status": "ok"}


def test_event_is_forwarded_field_by_field(shared_relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    attribution = {
        "pid": "src_abc",
        "clid": "cl1",
        **{f"sub{i}": f"s{i}" for i in range(1, 5)},
        **{f"adv{i}": f"a{i}" for i in range(1, 6)},
        "utm_source": "google",
        "utm_medium": "cpc",
        "utm_campaign": "spring",
        "utm_adgroup": "ag",
        "utm_matchtype": "exact",
        "utm_term": "car insurance",
        "utm_content": "v2",
        "utm_creative": "cr",
        "utm_placement": "top",
        "external_clickid": "ext-1",
        "tcpa_consent": 1,
        "tcpa_consent_date": "2026-11-26",
        "quote_id": "q-77",
    }
    before = time.time()
    response = post(
        shared_relay,
        {"event_id": "quote_viewed", "transaction_id": t, **attribution, "sub5": "browser-value"},
        headers={"User-Agent": "Mozilla/5.0 TestBrowser"},
    )
    after = time.time()
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "success"
    [event] = wait_for(lambda: sandbox.events(transaction_id=t), message="the event at the sandbox")
    body = event["body"]
    stamp = body.pop("conversion_date")
    assert body == {
        "transaction_id": t,
        "event_id": "quote_viewed",
        **attribution,
        "conversion_timezone": "EST",
        "cost": 1.25,
        "cost_operation": "add",
        "sub5": "from-server",
        "ip_address": "127.0.0.1",
        "user_agent": "Mozilla/5.0 TestBrowser",
    }
    moment = calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + 5 * 3600  # EST = UTC-5
    assert int(before) - 1 <= moment <= after + 1


def test_conversion_passes_conversion_id_through(shared_relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = post(shared_relay, {"event_id": "sale_completed", "transaction_id": t, "amount": 45.5})
    data = response.json()["data"]
    assert response.status_code == 200 and data["conversion"] is True
    assert data["conversion_id"].startswith("conv_")
    [event] = sandbox.events(transaction_id=t)
    assert event["answer"]["data"]["conversion_id"] == data["conversion_id"]
    assert event["body"]["amount"] == 45.5


def test_trigger_form_with_revenue_and_text_plain(shared_relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = httpx.post(
        shared_relay.url + "/api/event/trigger",
        content=f'{{"cid":"cmp_test","event_id":"sale_completed","transaction_id":"{t}",'
        f'"revenue":"19.99","pid":"src_1"}}',
        headers={"Origin": ORIGIN, "Content-Type": "text/plain;charset=UTF-8"},
    )
    assert response.status_code == 200, response.text
    [event] = sandbox.events(transaction_id=t)
    assert event["body"]["amount"] == 19.99 and event["body"]["pid"] == "src_1"
    assert event["cid"] == "cmp_test"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"transaction_id": "t"}, 400, "event_id is required"),
        ({"event_id": "quote_viewed"}, 400, "transaction_id is required"),
        ({"event_id": "nope", "transaction_id": "t"}, 400, "Invalid event_id for this campaign"),
        ({"event_id": "quote_viewed", "transaction_id": "t", "pid": "src_paused"}, 403, "Source Inactive"),
        (
            {"event_id": "sale_completed", "transaction_id": "t"},
            400,
            "amount is required for conversion events",
        ),
        (
            '{"event_id": "sale_completed", "transaction_id": "t", "amount": 1e400}',
            400,
            "Invalid fields: amount",
        ),
        (
            {"event_id": "sale_completed", "transaction_id": "t", "amount": 1.005},
            400,
            "Invalid fields: amount",
        ),
        (
            {"event_id": "quote_viewed", "transaction_id": "t", "tcpa_consent": 3},
            400,
            "Invalid fields: tcpa_consent",
        ),
        (
            {"event_id": "quote_viewed", "transaction_id": "t", "tcpa_consent_date": "2026-13-01"},
            400,
            "Invalid fields: tcpa_consent_date",
        ),
        ({"event_id": "quote_viewed", "transaction_id": "t", "cost": 9}, 400, "Invalid fields: cost"),
        ("not json", 400, "Invalid JSON body"),
        ('{"event_id": NaN}', 400, "Invalid JSON body"),
        ("[]", 400, "Invalid JSON body: expected an object"),
    ],
)
def test_rejections_reach_nobody(
    shared_relay: Relay, sandbox: Sandbox, body: Any, status: int, message: str
) -> None:
    response = post(shared_relay, body)
    assert (response.status_code, response.json()["message"]) == (status, message)
    assert response.json()["type"] == "error"
    assert sandbox.requests() == []


def test_trigger_needs_cid(shared_relay: Relay) -> None:
    response = httpx.post(
        shared_relay.url + "/api/event/trigger",
        json={"event_id": "x", "transaction_id": "t"},
        headers={"Origin": ORIGIN},
    )
    assert (response.status_code, response.json()["message"]) == (400, "cid is required")


def test_unknown_campaign_is_404(shared_relay: Relay, sandbox: Sandbox) -> None:
    response = post(shared_relay, {"event_id": "x", "transaction_id": "t"}, cid="cmp_nope")
    assert (response.status_code, response.json()["message"]) == (404, "Campaign not found")
    response = httpx.post(
        shared_relay.url + "/api/event/trigger",
        headers={"Origin": ORIGIN},
        json={"cid": "cmp_nope", "event_id": "x", "transaction_id": "t"},
    )
    assert response.status_code == 404
    assert sandbox.requests() == []


def test_form_posts_are_415(shared_relay: Relay) -> None:
    response = post(
        shared_relay, b"event_id=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415


def test_duplicate_known_to_the_relay(shared_relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    first = post(shared_relay, {"event_id": "form_submitted", "transaction_id": t})
    assert first.status_code == 200
    second = post(shared_relay, {"event_id": "form_submitted", "transaction_id": t})
    assert (second.status_code, second.json()["message"]) == (400, "Duplicate event for this transaction_id")
    assert len(sandbox.events(transaction_id=t)) == 1


def test_multi_trigger_events_repeat(shared_relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    sandbox.set_lock(0.2)
    try:
        assert post(shared_relay, {"event_id": "call_clicked", "transaction_id": t}).status_code == 200
        assert post(shared_relay, {"event_id": "call_clicked", "transaction_id": t}).status_code in (200, 202)
        wait_for(lambda: len(sandbox.events(transaction_id=t)) == 2, message="both calls delivered")
    finally:
        sandbox.set_lock(2.0)


def test_upstream_rejection_is_passed_through(shared_relay: Relay, sandbox: Sandbox) -> None:
    # relay_only exists in the relay's campaign but not in the sandbox's: Pingtree says no.
    response = post(shared_relay, {"event_id": "relay_only", "transaction_id": txn()})
    assert (response.status_code, response.json()["message"]) == (400, "Invalid event_id for this campaign")


def test_upstream_down_means_queued_not_lost(relay_factory: Any, sandbox: Sandbox) -> None:
    relay = relay_factory(inline_timeout=0.5)
    sandbox.fault(status=500)
    t = txn()
    response = post(relay, {"event_id": "quote_viewed", "transaction_id": t})
    assert response.status_code == 202 and response.json()["type"] == "queued"
    assert response.json()["data"]["event_uuid"]
    sandbox.clear_faults()
    wait_for(lambda: sandbox.events(transaction_id=t), message="delivery after the outage")


# --- origins and CORS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://www.example.com", True),
        ("https://shop.webflow.io", True),
        ("https://a.b.webflow.io", True),
        ("https://webflow.io", False),
        ("https://evilwebflow.io", False),
        ("http://www.example.com", False),
        ("https://www.example.com.evil.net", False),
        ("null", False),
        (None, False),
    ],
)
def test_origins(shared_relay: Relay, sandbox: Sandbox, origin: str | None, allowed: bool) -> None:
    t = txn()
    response = post(shared_relay, {"event_id": "quote_viewed", "transaction_id": t}, origin=origin)
    if allowed:
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.headers["Vary"]
    else:
        assert response.status_code == 403
        # Readable by the refused page (so its SDK stops retrying); nothing to echo for null or none.
        assert response.headers.get("Access-Control-Allow-Origin") == (origin if origin != "null" else None)
        assert sandbox.requests() == []


def test_a_refused_page_can_read_its_403_and_the_log_names_the_origin(shared_relay: Relay) -> None:
    origin = "https://not-listed.example.net"
    response = post(shared_relay, {"event_id": "quote_viewed", "transaction_id": txn()}, origin=origin)
    assert response.status_code == 403 and response.json()["message"] == "Origin not allowed"
    assert response.headers["Access-Control-Allow-Origin"] == origin and "Origin" in response.headers["Vary"]
    wait_for(
        lambda: f"origin '{origin}' refused for campaign cmp_test" in shared_relay.log(),
        message="the refused origin in the relay's log",
    )


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.com?.webflow.io",
        "https://user@evil.webflow.io",
        "https://evil .webflow.io",
        "https://evil.com/.webflow.io",
    ],
)
def test_malformed_wildcard_origins_are_refused_and_never_echoed(
    shared_relay: Relay, sandbox: Sandbox, origin: str
) -> None:
    response = post(shared_relay, {"event_id": "quote_viewed", "transaction_id": txn()}, origin=origin)
    assert response.status_code == 403 and response.json()["message"] == "Origin not allowed"
    assert "Access-Control-Allow-Origin" not in response.headers
    assert sandbox.requests() == []


def test_errors_are_readable_by_allowed_pages(shared_relay: Relay) -> None:
    response = post(shared_relay, {"event_id": "nope", "transaction_id": "t"})
    assert response.status_code == 400 and response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_preflight(shared_relay: Relay) -> None:
    ok = httpx.options(
        shared_relay.url + "/api/event/cmp_test",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert ok.status_code == 204 and ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    bad = httpx.options(shared_relay.url + "/api/event/cmp_test", headers={"Origin": "https://evil.example"})
    assert bad.status_code == 403 and "Access-Control-Allow-Origin" not in bad.headers


def test_campaign_origins_do_not_leak_across_campaigns(shared_relay: Relay) -> None:
    response = post(shared_relay, {"event_id": "signup", "transaction_id": "t"}, cid="cmp_other")
    assert response.status_code == 403


def test_pst_campaign_dates(shared_relay: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = post(
        shared_relay,
        {"event_id": "signup", "transaction_id": t},
        cid="cmp_other",
        origin="https://other.example.org",
    )
    assert response.status_code == 200
    [event] = sandbox.events(transaction_id=t)
    stamp = dt.datetime.strptime(event["body"]["conversion_date"], "%Y-%m-%d %H:%M:%S")
    utc_now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert abs((utc_now - dt.timedelta(hours=8) - stamp).total_seconds()) < 30
    assert event["body"]["conversion_timezone"] == "PST"


def test_relay_store_is_a_real_sqlite_file(shared_relay: Relay) -> None:
    assert Path(shared_relay.store_path).stat().st_size > 0
