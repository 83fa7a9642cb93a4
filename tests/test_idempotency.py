"""A client's event_uuid (or Idempotency-Key), on both stores: scoped to its campaign, and a reused
id with another event is refused (Stripe's rule), never replayed.

Each test runs against the relay's app in process (the rules are the app's; no server process is
needed for them) on a real SQLite file and on the session's real ``redis-server``, delivering to the
sandbox over loopback HTTP.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import InProcessRelay, InProcessRelayFactory, Sandbox, wait_for

pytest_plugins = ["tests.redis_fixture"]

KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}
A_ORIGIN = "https://www.example.com"  # cmp_test's
B_ORIGIN = "https://other.example.org"  # cmp_other's


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def relay(request: pytest.FixtureRequest, app_relay_factory: InProcessRelayFactory) -> InProcessRelay:
    if request.param == "redis":
        return app_relay_factory(store=request.getfixturevalue("redis_url"))
    return app_relay_factory()


def new_id() -> str:
    return f"id_{uuid.uuid4().hex[:20]}"


def post_a(relay: InProcessRelay, body: dict[str, Any], **kw: Any) -> Any:
    return relay.post(body, cid="cmp_test", origin=A_ORIGIN, **kw)


def post_b(relay: InProcessRelay, body: dict[str, Any], **kw: Any) -> Any:
    return relay.post(body, cid="cmp_other", origin=B_ORIGIN, **kw)


def test_an_id_used_by_campaign_b_does_not_return_campaign_as_answer(
    relay: InProcessRelay, sandbox: Sandbox
) -> None:
    uid, t = new_id(), f"txn_{uuid.uuid4().hex}"
    a = post_a(
        relay,
        {"event_id": "sale_completed", "transaction_id": t, "amount": 20, "pid": "src_a", "event_uuid": uid},
    )
    assert a.status_code == 200 and a.json()["data"]["conversion_id"], a.text
    b = post_b(relay, {"event_id": "signup", "transaction_id": f"b_{t}", "event_uuid": uid})
    assert b.status_code == 200, b.text
    data = b.json()["data"]
    assert data["event_uuid"] == uid  # the client's own id comes back, whatever the store calls it
    assert (data["cid"], data["transaction_id"]) == ("cmp_other", f"b_{t}")
    assert a.json()["data"]["conversion_id"] not in b.text and "src_a" not in b.text
    wait_for(lambda: sandbox.events(transaction_id=f"b_{t}"), message="campaign B's own event upstream")


def test_an_id_registered_first_in_campaign_b_does_not_suppress_campaign_as_event(
    relay: InProcessRelay, sandbox: Sandbox
) -> None:
    uid, t = new_id(), f"txn_{uuid.uuid4().hex}"
    assert (
        post_b(relay, {"event_id": "signup", "transaction_id": f"b_{t}", "event_uuid": uid}).status_code
        == 200
    )
    a = post_a(relay, {"event_id": "quote_viewed", "transaction_id": t, "event_uuid": uid})
    assert a.status_code == 200 and a.json()["data"]["event_uuid"] == uid, a.text
    [event] = wait_for(lambda: sandbox.events(transaction_id=t), message="campaign A's event upstream")
    assert event["cid"] == "cmp_test"


@pytest.mark.parametrize("how", ["event_uuid", "Idempotency-Key"])
def test_a_reused_id_with_another_event_is_422_and_never_a_replay(
    relay: InProcessRelay, sandbox: Sandbox, how: str
) -> None:
    uid, t = new_id(), f"txn_{uuid.uuid4().hex}"

    def send(body: dict[str, Any]) -> Any:
        if how == "event_uuid":
            return post_a(relay, {**body, "event_uuid": uid})
        return post_a(relay, body, headers={"Idempotency-Key": uid})

    first = send({"event_id": "sale_completed", "transaction_id": t, "amount": 20})
    assert first.status_code == 200, first.text
    again = send({"event_id": "sale_completed", "transaction_id": t, "amount": 2000})
    assert again.status_code == 422, again.text
    body = again.json()
    assert set(body) == KEYS and body["type"] == "error"
    assert "already used for a different event" in body["message"]
    assert body["invalidFields"] == {"event_uuid": "already used with a different body"}
    assert body["data"] == {}  # nothing of the first event's answer
    other = send({"event_id": "quote_viewed", "transaction_id": f"o_{t}"})
    assert other.status_code == 422, other.text
    assert [e["body"]["amount"] for e in sandbox.events(transaction_id=t)] == [20]
    assert sandbox.events(transaction_id=f"o_{t}") == []


def test_the_same_event_resent_is_a_replay_with_the_first_answer(
    relay: InProcessRelay, sandbox: Sandbox
) -> None:
    uid, t = new_id(), f"txn_{uuid.uuid4().hex}"
    body = {"event_id": "sale_completed", "transaction_id": t, "amount": 20, "sub1": "x", "event_uuid": uid}
    first = post_a(relay, body)
    # The same event in other clothes: keys reordered, the amount as a string with two decimals.
    again = post_a(
        relay,
        {
            "event_uuid": uid,
            "sub1": "x",
            "amount": "20.00",
            "transaction_id": t,
            "event_id": "sale_completed",
        },
        headers={"User-Agent": "another browser"},
    )
    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json()["data"] == first.json()["data"]
    assert len(sandbox.events(transaction_id=t)) == 1
