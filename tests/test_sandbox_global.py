"""The sandbox's Global Event Postback API (``POST /api/event/global/{org-id}``): the campaign comes
from the lead the transaction id names. Through Flask's test client: the rules, not the transport."""

from __future__ import annotations

import tomllib

import pytest
from flask.testing import FlaskClient

from server.config import parse_config
from server.sandbox import create_sandbox_app

CAMPAIGNS = """
[relay]
upstream_url = "http://127.0.0.1:1"
[campaigns.cmp_a.events.visit]
[campaigns.cmp_a.events.call]
conversion = true
[campaigns.cmp_b.events.visit]
"""


@pytest.fixture
def client() -> FlaskClient:
    return create_sandbox_app(parse_config(tomllib.loads(CAMPAIGNS)), lock_seconds=0).test_client()


def test_the_lead_names_the_campaign(client: FlaskClient) -> None:
    assert (
        client.post("/api/event/cmp_b", json={"event_id": "visit", "transaction_id": "T-b"}).status_code
        == 200
    )
    assert (
        client.post("/api/event/cmp_a", json={"event_id": "visit", "transaction_id": "T-a"}).status_code
        == 200
    )
    answer = client.post(
        "/api/event/global/org_1", json={"event_id": "call", "transaction_id": "T-a", "amount": 9}
    )
    assert answer.status_code == 200, answer.json
    assert answer.json["data"]["cid"] == "cmp_a" and answer.json["data"]["conversion_id"].startswith("conv_")
    events = client.get("/_sandbox/events?event_id=call").json["events"]
    assert [(e["cid"], e["transaction_id"]) for e in events] == [("cmp_a", "T-a")]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"event_id": "call", "transaction_id": "T-nobody", "amount": 1}, 404, "Lead Not Found"),
        ({"event_id": "call", "amount": 1}, 400, "transaction_id is required"),
        ({"transaction_id": "T-a"}, 400, "event_id is required"),
        ({"event_id": "call", "transaction_id": "T-a"}, 400, "revenue is required for conversion events"),
        ({"event_id": "other", "transaction_id": "T-a"}, 400, "Invalid event_id for this campaign"),
    ],
)
def test_refusals(client: FlaskClient, body: dict[str, object], status: int, message: str) -> None:
    client.post("/api/event/cmp_a", json={"event_id": "visit", "transaction_id": "T-a"})
    answer = client.post("/api/event/global/org_1", json=body)
    assert (answer.status_code, answer.json["message"]) == (status, message)


def test_revenue_is_read_from_either_name(client: FlaskClient) -> None:
    client.post("/api/event/cmp_a", json={"event_id": "visit", "transaction_id": "T-r"})
    answer = client.post(
        "/api/event/global/org_1", json={"event_id": "call", "transaction_id": "T-r", "revenue": 4}
    )
    assert answer.status_code == 200, answer.json
