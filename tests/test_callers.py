"""Server-side callers (server/callers.py), through the relay's app in process and the sandbox: what a backend copying
Pingtree's own curl example meets, the Bearer form of the key, the visitor's ip_address and
user_agent passed through, and the answer saying which fields the relay set or replaced."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.callers import server_keys, visitor
from tests.conftest import InProcessRelay, Sandbox, make_relay

KEY = "sk_test_callers_0123456789"
CAMPAIGNS = f"""
[campaigns.cmp_test]
allowed_origins = ["https://www.example.com"]
allow_server_calls = true
server_key = "{KEY}"
[campaigns.cmp_test.server_fields]
cost = 1.25
cost_operation = "add"
[campaigns.cmp_test.events.quote_viewed]
inline = true
[campaigns.cmp_test.events.sale_completed]
conversion = true

[campaigns.cmp_other]
allowed_origins = ["https://other.example.org"]
[campaigns.cmp_other.events.signup]
inline = true
"""


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox, pages_port: int
) -> Iterator[InProcessRelay]:
    """The app in process: what a caller may send is the app's rule, no server process needed."""
    config = make_relay(tmp_path_factory.mktemp("callers"), sandbox.url, pages_port, CAMPAIGNS).config_path
    app = InProcessRelay(config)
    yield app
    app.close()


def post(relay: InProcessRelay, cid: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    """Like Pingtree's curl example: JSON, no Origin, a library's User-Agent."""
    h = {"User-Agent": "curl/8.5.0", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return relay.http.post(f"/api/event/{cid}", json=body, headers=h, timeout=15)


def txn() -> str:
    return f"txn_{uuid.uuid4()}"


def test_no_origin_on_a_browser_only_campaign_says_what_to_do(
    relay: InProcessRelay, sandbox: Sandbox
) -> None:
    answer = post(relay, "cmp_other", {"event_id": "signup", "transaction_id": txn()})
    assert answer.status_code == 403
    message = answer.json()["message"]
    for needed in (
        "Origin header missing",
        "campaigns.cmp_other.allowed_origins",
        "Authorization: Bearer <key>",
        "campaigns.cmp_other.allow_server_calls = true",
        "campaigns.cmp_other.server_key",
    ):
        assert needed in message, message
    assert sandbox.requests() == []


def test_no_key_names_both_headers_and_the_config_key(relay: InProcessRelay, sandbox: Sandbox) -> None:
    answer = post(relay, "cmp_test", {"event_id": "quote_viewed", "transaction_id": txn()})
    assert answer.status_code == 403
    message = answer.json()["message"]
    assert "'Authorization: Bearer <key>'" in message and "'X-Server-Key: <key>'" in message
    assert "campaigns.cmp_test.server_key" in message
    assert KEY not in answer.text
    assert sandbox.requests() == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer   {KEY}"},
        {"X_Server_Key": KEY},
        {"X_Server_Key": KEY, "Authorization": f"Bearer {KEY}"},
    ],
)
def test_the_key_as_bearer_or_header(
    relay: InProcessRelay, sandbox: Sandbox, headers: dict[str, str]
) -> None:
    t = txn()
    answer = post(relay, "cmp_test", {"event_id": "quote_viewed", "transaction_id": t}, **headers)
    assert answer.status_code == 200, answer.text
    assert len(sandbox.events(transaction_id=t)) == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sk_wrong"},
        {"Authorization": f"Bearer {KEY}", "X_Server_Key": "sk_wrong"},  # one wrong key is a wrong caller
    ],
)
def test_a_wrong_key_is_refused(relay: InProcessRelay, sandbox: Sandbox, headers: dict[str, str]) -> None:
    answer = post(relay, "cmp_test", {"event_id": "quote_viewed", "transaction_id": txn()}, **headers)
    assert (answer.status_code, answer.json()["message"]) == (403, "Invalid server key")
    assert sandbox.requests() == []


def test_the_visitors_address_and_browser_are_the_callers_to_give(
    relay: InProcessRelay, sandbox: Sandbox
) -> None:
    t = txn()
    visitor_ua = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1"
    answer = post(
        relay,
        "cmp_test",
        {
            "event_id": "sale_completed",
            "transaction_id": t,
            "amount": 45,
            "ip_address": "203.0.113.77",
            "user_agent": visitor_ua,
            "cost": 9,
            "conversion_date": "2020-01-01 00:00:00",
        },
        Authorization=f"Bearer {KEY}",
    )
    assert answer.status_code == 200, answer.text
    [event] = sandbox.events(transaction_id=t)
    body = event["body"]
    assert (body["ip_address"], body["user_agent"]) == ("203.0.113.77", visitor_ua)  # not the backend's
    assert body["cost"] == 1.25 and body["conversion_date"] != "2020-01-01 00:00:00"
    assert answer.json()["data"]["relay_fields"] == {
        "conversion_date": "replaced",
        "conversion_timezone": "set",
        "cost": "replaced",
        "cost_operation": "set",
    }


def test_without_them_the_backends_own_are_not_forwarded(relay: InProcessRelay, sandbox: Sandbox) -> None:
    t = txn()
    answer = post(relay, "cmp_test", {"event_id": "quote_viewed", "transaction_id": t}, X_Server_Key=KEY)
    assert answer.status_code == 200, answer.text
    body = sandbox.events(transaction_id=t)[0]["body"]
    assert "ip_address" not in body and "user_agent" not in body  # 127.0.0.1 and curl are not the visitor
    assert answer.json()["data"]["relay_fields"]["cost"] == "set"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ip_address", "999.1.1.1"),
        ("ip_address", 7),
        ("user_agent", "x" * 513),
        ("user_agent", "Mozilla/5.0\r\nX-Evil: 1"),
        ("user_agent", "Mozilla/5.0\x00"),
    ],
)
def test_passed_visitor_fields_are_checked(
    relay: InProcessRelay, sandbox: Sandbox, field: str, value: Any
) -> None:
    answer = post(
        relay,
        "cmp_test",
        {"event_id": "quote_viewed", "transaction_id": txn(), field: value},
        Authorization=f"Bearer {KEY}",
    )
    assert answer.status_code == 400 and field in answer.json()["invalidFields"]
    assert sandbox.requests() == []


def test_browsers_get_no_relay_fields_and_keep_their_own_address(
    relay: InProcessRelay, sandbox: Sandbox
) -> None:
    t = txn()
    answer = relay.http.post(
        "/api/event/cmp_test",
        json={"event_id": "quote_viewed", "transaction_id": t},
        headers={"Origin": "https://www.example.com", "User-Agent": "Mozilla/5.0 Firefox/126"},
    )
    assert answer.status_code == 200 and "relay_fields" not in answer.json()["data"]
    assert sandbox.events(transaction_id=t)[0]["body"]["ip_address"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("headers", "keys"),
    [
        ({}, []),
        ({"Authorization": "Basic dXNlcjpwdw=="}, []),
        ({"Authorization": "Bearer k1"}, ["k1"]),
        ({"X-Server-Key": " k2 ", "Authorization": "BEARER k3"}, ["k2", "k3"]),
        ({"Authorization": "Bearer "}, []),
    ],
)
def test_server_keys(headers: dict[str, str], keys: list[str]) -> None:
    assert server_keys(headers.get) == keys


def test_visitor() -> None:
    assert visitor(False, {"ip_address": "1.2.3.4"}, "10.0.0.1", "ua") == ("10.0.0.1", "ua")
    assert visitor(True, {"ip_address": "1.2.3.4"}, "10.0.0.1", "ua") == ("1.2.3.4", None)
