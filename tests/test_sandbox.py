"""The Pingtree sandbox: the documented rules, the lock, deduplication, recording, faults, serving.

Most tests drive the app through Flask's test client; the drop fault, timeouts and concurrency are
checked against the real thing, ``python -m server.sandbox`` under gunicorn, through httpx.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from server.config import parse_config
from server.errors import ApiError
from server.sandbox import ConnectionDropped, SandboxState, create_sandbox_app
from server.sandbox.rules import check_event
from tests.conftest import wait_for
from tests.test_sandbox_server import running_sandbox

ROOT = Path(__file__).resolve().parent.parent
LOCK = 0.3  # short lock window for tests that wait it out

CONFIG: dict[str, Any] = {
    "relay": {"upstream_url": "http://127.0.0.1:9"},
    "campaigns": {
        "cmp_test": {
            "inactive_sources": ["src_paused"],
            "events": {
                "quote_viewed": {},
                "form_step": {"allow_duplicates": True},
                "sale": {"conversion": True},
                "renewal": {"conversion": True, "allow_duplicates": True},
            },
        },
        "cmp_other": {"events": {"signup": {}}},
    },
}
CONFIG_TOML = """
[relay]
upstream_url = "http://127.0.0.1:9"
[campaigns.cmp_test]
inactive_sources = ["src_paused"]
[campaigns.cmp_test.events.quote_viewed]
[campaigns.cmp_test.events.form_step]
allow_duplicates = true
[campaigns.cmp_test.events.sale]
conversion = true
"""
ANSWER_KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}


@pytest.fixture
def app() -> Flask:
    """A fresh sandbox with a short lock window."""
    return create_sandbox_app(parse_config(CONFIG), lock_seconds=LOCK)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def fire(
    client: FlaskClient, form: str, body: dict[str, Any], cid: str = "cmp_test"
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to one of the two documented forms ("campaign" or "trigger"); (status, answer)."""
    if form == "trigger":
        response = client.post("/api/event/trigger", json={"cid": cid, **body})
    else:
        response = client.post(f"/api/event/{cid}", json=body)
    answer = response.get_json()
    assert set(answer) == ANSWER_KEYS, answer
    assert answer["status"] == response.status_code
    assert answer["type"] == ("success" if response.status_code == 200 else "error")
    return response.status_code, answer


def fire_after_lock(client: FlaskClient, form: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Retry while the answer is "Concurrent event in progress" (a 403 does not extend the lock)."""
    return wait_for(lambda: (r := fire(client, form, body))[0] != 403 and r, 5.0, 0.02, "the lock to pass")


def events(client: FlaskClient, **query: str) -> list[dict[str, Any]]:
    return client.get("/_sandbox/events", query_string=query).get_json()["events"]


# --- the rule table ---------------------------------------------------------------------------------

QV = {"event_id": "quote_viewed", "transaction_id": "txn_1"}
SALE = {"event_id": "sale", "transaction_id": "txn_1"}
OK = "Event triggered successfully"

# (case id, body without cid, status, message); run against both documented forms.
RULES: list[tuple[str, dict[str, Any], int, str]] = [
    ("plain event", QV, 200, OK),
    ("event with pid", {**QV, "pid": "src_live"}, 200, OK),
    ("missing event_id", {"transaction_id": "txn_1"}, 400, "event_id is required"),
    ("empty event_id", {**QV, "event_id": ""}, 400, "event_id is required"),
    ("missing transaction_id", {"event_id": "quote_viewed"}, 400, "transaction_id is required"),
    ("null transaction_id", {**QV, "transaction_id": None}, 400, "transaction_id is required"),
    ("numeric transaction_id", {**QV, "transaction_id": 7}, 400, "Invalid transaction_id"),
    ("both ids missing: event_id first", {}, 400, "event_id is required"),
    ("unknown event", {**QV, "event_id": "nope"}, 400, "Invalid event_id for this campaign"),
    ("event of another campaign", {**QV, "event_id": "signup"}, 400, "Invalid event_id for this campaign"),
    (
        "unknown event before inactive pid",
        {**QV, "event_id": "nope", "pid": "src_paused"},
        400,
        "Invalid event_id for this campaign",
    ),
    ("inactive source", {**QV, "pid": "src_paused"}, 403, "Source Inactive"),
    ("inactive source before revenue", {**SALE, "pid": "src_paused"}, 403, "Source Inactive"),
    ("non-string pid", {**QV, "pid": 5}, 400, "Invalid pid"),
    ("conversion without revenue", SALE, 400, "revenue is required for conversion events"),
    (
        "conversion with null revenue",
        {**SALE, "revenue": None, "amount": None},
        400,
        "revenue is required for conversion events",
    ),
    ("date only", {**QV, "conversion_date": "2024-02-29"}, 200, OK),
    ("date and time", {**QV, "conversion_date": "2024-02-29 23:59:59"}, 200, OK),
    ("impossible date", {**QV, "conversion_date": "2023-02-29"}, 400, "Invalid conversion_date"),
    ("date without seconds", {**QV, "conversion_date": "2024-01-05 10:11"}, 400, "Invalid conversion_date"),
    ("date not padded", {**QV, "conversion_date": "2024-1-5"}, 400, "Invalid conversion_date"),
    ("iso date", {**QV, "conversion_date": "2024-01-05T10:11:12"}, 400, "Invalid conversion_date"),
    ("date and a newline", {**QV, "conversion_date": "2024-01-05\n"}, 400, "Invalid conversion_date"),
    (
        "date in other digits",
        {**QV, "conversion_date": "\u0662\u0660\u0662\u0664-\u0660\u0661-\u0660\u0665"},
        400,
        "Invalid conversion_date",
    ),
    ("no such hour", {**QV, "conversion_date": "2024-01-05 24:00:00"}, 400, "Invalid conversion_date"),
    ("timezone", {**QV, "conversion_timezone": "AKST"}, 200, OK),
    ("unknown timezone", {**QV, "conversion_timezone": "PDT"}, 400, "Invalid conversion_timezone"),
    ("cost_operation sic", {**QV, "cost_operation": "substract", "cost": 1.5}, 200, OK),
    ("cost_operation spelled right", {**QV, "cost_operation": "subtract"}, 400, "Invalid cost_operation"),
    ("non-numeric cost", {**QV, "cost": "lots"}, 400, "Invalid cost"),
    (
        "two bad fields",
        {**QV, "conversion_timezone": "UTC", "cost_operation": "x"},
        400,
        "Invalid conversion_timezone, cost_operation",
    ),
]


@pytest.mark.parametrize("form", ["campaign", "trigger"])
@pytest.mark.parametrize(("body", "status", "message"), [c[1:] for c in RULES], ids=[c[0] for c in RULES])
def test_rule_table(client: FlaskClient, form: str, body: dict[str, Any], status: int, message: str) -> None:
    got_status, answer = fire(client, form, body)
    assert (got_status, answer["message"]) == (status, message)
    # Only accepted events are recorded as events; every request is recorded as a request.
    assert len(events(client)) == (1 if status == 200 else 0)
    assert client.get("/_sandbox/requests").get_json()["requests"][0]["status"] == status


def test_rule_fields_name_the_problem(client: FlaskClient) -> None:
    _, answer = fire(client, "campaign", {"transaction_id": "t"})
    assert answer["missingFields"] == {"event_id": "event_id is required"}
    _, answer = fire(client, "campaign", {**QV, "conversion_date": "x", "conversion_timezone": "PDT"})
    assert set(answer["invalidFields"]) == {"conversion_date", "conversion_timezone"}


# (body without cid, field named in the answer) per form: revenue is `amount` on /api/event/{cid},
# `revenue` on /api/event/trigger, which also accepts `amount`.
REVENUE_CASES: list[tuple[str, str, dict[str, Any], int, str, dict[str, Any]]] = [
    ("campaign", "amount", {"amount": 45.5}, 200, OK, {}),
    ("campaign", "amount zero", {"amount": 0}, 200, OK, {}),
    ("campaign", "numeric string", {"amount": "45.00"}, 200, OK, {}),
    (
        "campaign",
        "revenue is not its field",
        {"revenue": 45},
        400,
        "revenue is required for conversion events",
        {"missingFields": {"amount": "revenue is required for conversion events"}},
    ),
    ("campaign", "negative", {"amount": -1}, 400, "Invalid revenue", {"invalidFields": {"amount": ...}}),
    ("campaign", "word", {"amount": "lots"}, 400, "Invalid revenue", {"invalidFields": {"amount": ...}}),
    ("campaign", "boolean", {"amount": True}, 400, "Invalid revenue", {"invalidFields": {"amount": ...}}),
    ("trigger", "revenue", {"revenue": 45}, 200, OK, {}),
    ("trigger", "amount accepted", {"amount": 45}, 200, OK, {}),
    (
        "trigger",
        "missing",
        {},
        400,
        "revenue is required for conversion events",
        {"missingFields": {"revenue": "revenue is required for conversion events"}},
    ),
    ("trigger", "negative", {"revenue": -0.01}, 400, "Invalid revenue", {"invalidFields": {"revenue": ...}}),
    ("trigger", "object", {"revenue": {"x": 1}}, 400, "Invalid revenue", {"invalidFields": {"revenue": ...}}),
]


@pytest.mark.parametrize(
    ("form", "case", "extra", "status", "message", "fields"),
    REVENUE_CASES,
    ids=[f"{c[0]}-{c[1]}" for c in REVENUE_CASES],
)
def test_conversion_revenue(
    client: FlaskClient,
    form: str,
    case: str,
    extra: dict[str, Any],
    status: int,
    message: str,
    fields: dict[str, Any],
) -> None:
    got_status, answer = fire(client, form, {**SALE, **extra})
    assert (got_status, answer["message"]) == (status, message)
    for key, expected in fields.items():
        assert answer[key].keys() == expected.keys()
        assert all(v is ... or answer[key][k] == v for k, v in expected.items())


def test_non_finite_revenue_is_invalid(client: FlaskClient) -> None:
    # 1e999 is valid JSON that Python reads as infinity.
    raw = '{"cid": "cmp_test", "event_id": "sale", "transaction_id": "t", "revenue": 1e999}'
    response = client.post("/api/event/trigger", data=raw, content_type="application/json")
    assert (response.status_code, response.get_json()["message"]) == (400, "Invalid revenue")


@pytest.mark.parametrize(
    ("form", "cid", "body", "message"),
    [
        ("trigger", None, QV, "cid is required"),
        ("trigger", "", QV, "cid is required"),
        ("trigger", "cmp_nope", QV, "Invalid cid"),
        ("trigger", 12, QV, "Invalid cid"),
        ("trigger", None, {}, "cid is required"),  # cid is checked before everything else
        ("campaign", "cmp_nope", QV, "Invalid cid"),
        ("campaign", "cmp_nope", {}, "Invalid cid"),
    ],
)
def test_campaign_rules(client: FlaskClient, form: str, cid: Any, body: dict[str, Any], message: str) -> None:
    if form == "trigger":
        payload = body if cid is None else {"cid": cid, **body}
        response = client.post("/api/event/trigger", json=payload)
    else:
        response = client.post(f"/api/event/{cid}", json=body)
    assert (response.status_code, response.get_json()["message"]) == (400, message)


def test_path_cid_wins_over_body_cid(client: FlaskClient) -> None:
    status, answer = fire(client, "campaign", {**QV, "cid": "cmp_other"})
    assert (status, answer["data"]["cid"]) == (200, "cmp_test")


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("not json", "application/json"),
        ("[1, 2]", "application/json"),
        ('"a string"', "application/json"),
        ('{"event_id": NaN}', "application/json"),
        (b"\xff\xfe{}", "application/json"),
        ("event_id=quote_viewed&transaction_id=t", "application/x-www-form-urlencoded"),
        ("", "application/json"),
    ],
)
def test_invalid_json_body(client: FlaskClient, data: str | bytes, content_type: str) -> None:
    for path in ("/api/event/cmp_test", "/api/event/trigger"):
        response = client.post(path, data=data, content_type=content_type)
        assert (response.status_code, response.get_json()["message"]) == (400, "Invalid JSON body")


def test_text_plain_json_is_accepted(client: FlaskClient) -> None:
    # What navigator.sendBeacon sends: no CORS preflight.
    response = client.post(
        "/api/event/trigger",
        data=json.dumps({"cid": "cmp_test", **QV}),
        content_type="text/plain;charset=UTF-8",
    )
    assert response.status_code == 200


# --- success answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["campaign", "trigger"])
def test_success_data(client: FlaskClient, form: str) -> None:
    status, answer = fire(client, form, QV)
    assert status == 200 and answer["message"] == OK
    assert answer["data"] == {
        "cid": "cmp_test",
        "pid": "organic",
        "transaction_id": "txn_1",
        "conversion_id": "",
        "conversion": False,
    }
    _, answer = fire(client, form, {**SALE, "pid": "src_live", "amount": 10, "revenue": 10})
    data = answer["data"]
    assert (data["pid"], data["conversion"]) == ("src_live", True)
    assert re.fullmatch(r"conv_[0-9a-f\-]{36}", data["conversion_id"])
    assert uuid.UUID(data["conversion_id"][5:]).version == 4


def test_conversion_ids_are_unique(client: FlaskClient) -> None:
    ids = {
        fire(client, "trigger", {"event_id": "renewal", "transaction_id": f"t{i}", "revenue": 1})[1]["data"][
            "conversion_id"
        ]
        for i in range(20)
    }
    assert len(ids) == 20


# --- the 2-second lock ----------------------------------------------------------------------------------


def test_lock_rejects_a_second_request_within_the_window(client: FlaskClient) -> None:
    started = time.monotonic()
    assert fire(client, "campaign", {"event_id": "form_step", "transaction_id": "t"})[0] == 200
    status, answer = fire(client, "trigger", {"event_id": "form_step", "transaction_id": "t"})
    assert (status, answer["message"]) == (403, "Concurrent event in progress")
    # Another transaction, another event or another campaign is not locked.
    assert fire(client, "campaign", {"event_id": "form_step", "transaction_id": "t2"})[0] == 200
    assert fire(client, "campaign", {"event_id": "quote_viewed", "transaction_id": "t"})[0] == 200
    assert fire(client, "campaign", {"event_id": "signup", "transaction_id": "t"}, cid="cmp_other")[0] == 200
    # After the window the repeatable event fires again.
    assert fire_after_lock(client, "campaign", {"event_id": "form_step", "transaction_id": "t"})[0] == 200
    assert time.monotonic() - started >= LOCK
    assert len(events(client, event_id="form_step", transaction_id="t")) == 2


def test_lock_comes_before_duplicate_check(client: FlaskClient) -> None:
    assert fire(client, "campaign", QV)[0] == 200
    assert fire(client, "campaign", QV)[1]["message"] == "Concurrent event in progress"
    status, answer = fire_after_lock(client, "campaign", QV)
    assert (status, answer["message"]) == (400, "Duplicate event for this transaction_id")


def test_rejected_requests_do_not_take_the_lock(client: FlaskClient) -> None:
    assert fire(client, "trigger", {**SALE, "revenue": "x"})[1]["message"] == "Invalid revenue"
    assert fire(client, "trigger", {**SALE, "revenue": 3})[0] == 200


def test_lock_window_measured_from_the_last_processed_request() -> None:
    """With a fake clock: a 403 does not extend the lock, a duplicate rejection does."""
    now = [0.0]
    config = parse_config(CONFIG)
    state = SandboxState(config.campaigns, lock_seconds=2.0, clock=lambda: now[0])
    accepted = check_event(config.campaigns, QV, path_cid="cmp_test")

    def outcome(at: float) -> str:
        now[0] = at
        try:
            return state.fire(accepted, QV)["message"]
        except ApiError as exc:
            return exc.message

    assert outcome(0.0) == OK
    assert outcome(1.99) == "Concurrent event in progress"
    assert outcome(2.0) == "Duplicate event for this transaction_id"  # 403 at 1.99 did not extend it
    assert outcome(3.5) == "Concurrent event in progress"  # the duplicate reached processing: locked
    assert outcome(4.0) == "Duplicate event for this transaction_id"


def test_lock_seconds_can_be_changed(client: FlaskClient) -> None:
    assert client.get("/_sandbox/config").get_json() == {"lock_seconds": LOCK}
    assert client.post("/_sandbox/config", json={"lock_seconds": 0}).get_json() == {"lock_seconds": 0}
    body = {"event_id": "form_step", "transaction_id": "t"}
    assert [fire(client, "campaign", body)[0] for _ in range(3)] == [200, 200, 200]
    for bad in ({"lock_seconds": -1}, {"lock_seconds": "2"}, {"other": 1}, [1]):
        assert client.post("/_sandbox/config", json=bad).status_code == 400
    assert client.post("/_sandbox/config", json={"lock_seconds": 0.5}).get_json() == {"lock_seconds": 0.5}


# --- duplicates -------------------------------------------------------------------------------------------


def test_duplicates_are_per_campaign_transaction_and_event(client: FlaskClient) -> None:
    assert fire(client, "campaign", SALE | {"amount": 1})[0] == 200
    # Both documented forms share one memory of fired events.
    status, answer = fire_after_lock(client, "trigger", SALE | {"revenue": 1})
    assert (status, answer["message"]) == (400, "Duplicate event for this transaction_id")
    assert fire(client, "trigger", SALE | {"transaction_id": "txn_2", "revenue": 1})[0] == 200
    assert len(events(client, event_id="sale")) == 2


def test_allow_duplicates_fires_again(client: FlaskClient) -> None:
    body = {"event_id": "renewal", "transaction_id": "t", "revenue": 5}
    first = fire(client, "trigger", body)[1]["data"]["conversion_id"]
    status, answer = fire_after_lock(client, "trigger", body)
    assert status == 200 and answer["data"]["conversion_id"] != first
    assert len(events(client, event_id="renewal")) == 2


# --- recording and the control API ---------------------------------------------------------------------


def test_events_keep_the_body_field_by_field(client: FlaskClient) -> None:
    body = {
        **SALE,
        "amount": 45.5,
        "pid": "src_live",
        "sub1": "a",
        "utm_source": "g",
        "cost": 1.25,
        "cost_operation": "add",
        "first_name": "Ann",
        "tcpa_consent": 1,
    }
    client.post("/api/event/cmp_test", json=body, headers={"User-Agent": "relay-test/1"})
    fire(client, "trigger", QV | {"transaction_id": "other"})
    [event] = events(client, transaction_id="txn_1")
    assert event["body"] == body
    assert (event["cid"], event["event_id"], event["answer"]["status"]) == ("cmp_test", "sale", 200)
    assert event["answer"]["data"]["conversion"] is True
    assert [e["transaction_id"] for e in events(client)] == ["txn_1", "other"]
    assert events(client, cid="cmp_other") == []
    request = client.get("/_sandbox/requests").get_json()["requests"][0]
    assert request["headers"]["user-agent"] == "relay-test/1"
    assert (request["path"], request["status"], request["body"]) == ("/api/event/cmp_test", 200, body)


def test_requests_and_stats_count_rejections(client: FlaskClient) -> None:
    fire(client, "campaign", QV)
    fire(client, "campaign", QV)
    fire(client, "campaign", {**QV, "pid": "src_paused"})
    client.post(
        "/api/event/trigger",
        data="nope",
        content_type="text/plain",
        headers={"Authorization": "Bearer secret"},
    )
    requests = client.get("/_sandbox/requests").get_json()["requests"]
    assert [r["status"] for r in requests] == [200, 403, 403, 400]
    assert requests[3]["body"] == "nope" and requests[3]["headers"]["authorization"] == "[redacted]"
    stats = client.get("/_sandbox/stats").get_json()
    assert (stats["requests"], stats["accepted"], stats["rejected"]) == (4, 1, 3)
    assert stats["by_status"] == {"200": 1, "403": 2, "400": 1}
    assert stats["by_message"]["Source Inactive"] == 1


def test_reset_clears_records_locks_duplicates_and_faults(client: FlaskClient) -> None:
    fire(client, "campaign", QV)
    client.post("/_sandbox/faults", json={"status": 500})
    assert client.post("/_sandbox/reset").status_code == 200
    assert events(client) == [] and client.get("/_sandbox/requests").get_json() == {"requests": []}
    assert client.get("/_sandbox/faults").get_json() == {"faults": []}
    assert fire(client, "campaign", QV)[0] == 200  # neither locked nor a duplicate any more
    assert client.get("/_sandbox/stats").get_json()["requests"] == 1


def test_errors_outside_the_rules_keep_pingtree_shape(client: FlaskClient) -> None:
    for response, status in ((client.get("/api/event/cmp_test"), 405), (client.get("/nope"), 404)):
        assert response.status_code == status and set(response.get_json()) == ANSWER_KEYS


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_page_lists_campaigns_and_latest_requests_escaped(client: FlaskClient) -> None:
    fire(client, "campaign", {**QV, "transaction_id": "<b>txn_page</b>"})
    fire(client, "campaign", {**QV, "pid": "src_paused"})
    page = client.get("/").get_data(as_text=True)
    assert "&lt;b&gt;txn_page&lt;/b&gt;" in page and "<b>txn_page" not in page
    assert "Source Inactive" in page and "sale</code> (conversion)" in page
    assert 'href="/_sandbox/events"' in page and "<script" not in page


def test_works_mounted_under_a_prefix(app: Flask) -> None:
    mounted = Client(DispatcherMiddleware(Flask("relay"), {"/sandbox": app}))
    response = mounted.post("/sandbox/api/event/trigger", json={"cid": "cmp_test", **QV})
    assert response.status_code == 200
    assert len(mounted.get("/sandbox/_sandbox/events").json["events"]) == 1
    page = mounted.get("/sandbox/").get_data(as_text=True)
    assert 'href="/sandbox/_sandbox/events"' in page and "POST /sandbox/api/event/trigger" in page


# --- faults (test client) ---------------------------------------------------------------------------------


def test_status_fault_answers_without_processing(client: FlaskClient) -> None:
    client.post("/_sandbox/faults", json={"status": 500, "count": 2})
    assert client.get("/_sandbox/faults").get_json()["faults"][0]["remaining"] == 2
    assert [fire(client, "campaign", {**QV, "transaction_id": f"t{i}"})[0] for i in range(3)] == [
        500,
        500,
        200,
    ]
    assert [e["transaction_id"] for e in events(client)] == ["t2"]
    assert client.get("/_sandbox/faults").get_json() == {"faults": []}
    assert client.get("/_sandbox/stats").get_json()["faults_applied"] == 2


def test_fault_without_count_lasts_until_cleared(client: FlaskClient) -> None:
    client.post("/_sandbox/faults", json={"status": 503, "message": "Pingtree is down"})
    for _ in range(3):
        assert fire(client, "trigger", QV)[1]["message"] == "Pingtree is down"
    # Faults apply to event endpoints only.
    assert client.get("/_sandbox/events").status_code == 200 and client.get("/healthz").status_code == 200
    assert client.delete("/_sandbox/faults").status_code == 200
    assert fire(client, "trigger", QV)[0] == 200


def test_fault_queue_applies_in_order(client: FlaskClient) -> None:
    client.post("/_sandbox/faults", json=[{"status": 503, "count": 1}, {"status": 429, "count": 1}])
    assert [fire(client, "campaign", QV)[0] for _ in range(3)] == [503, 429, 200]


def test_status_fault_after_processing_records_the_event(client: FlaskClient) -> None:
    client.post("/_sandbox/faults", json={"status": 500, "when": "after", "count": 1})
    assert fire(client, "campaign", QV)[0] == 500
    assert len(events(client)) == 1
    assert fire_after_lock(client, "campaign", QV)[1]["message"] == "Duplicate event for this transaction_id"


@pytest.mark.parametrize("when", ["before", "after"])
def test_delay_fault_still_processes(client: FlaskClient, when: str) -> None:
    client.post("/_sandbox/faults", json={"delay_ms": 250, "when": when, "count": 1})
    started = time.monotonic()
    assert fire(client, "campaign", QV)[0] == 200
    assert time.monotonic() - started >= 0.25
    assert len(events(client)) == 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_drop_fault_without_a_socket_raises(client: FlaskClient, when: str) -> None:
    client.post("/_sandbox/faults", json={"drop": True, "when": when, "count": 1})
    with pytest.raises(ConnectionDropped):
        client.post("/api/event/cmp_test", json=QV)
    assert len(events(client)) == (1 if when == "after" else 0)
    assert client.get("/_sandbox/requests").get_json()["requests"][0]["status"] is None


@pytest.mark.parametrize(
    "fault",
    [
        {},
        {"status": 99},
        {"status": "500"},
        {"status": 500, "count": 0},
        {"drop": True, "status": 500},
        {"delay_ms": -1},
        {"delay_ms": 10, "when": "later"},
        {"drop": "yes"},
        {"status": 500, "bogus": 1},
        [1],
    ],
)
def test_bad_fault_is_refused(client: FlaskClient, fault: Any) -> None:
    response = client.post("/_sandbox/faults", json=fault)
    assert response.status_code == 400 and response.get_json()["message"].startswith("Invalid fault")
    assert client.get("/_sandbox/faults").get_json() == {"faults": []}


# --- the real server: python -m server.sandbox under gunicorn ------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m server.sandbox`` on a port it binds itself; yields its base URL once /healthz answers."""
    with running_sandbox(tmp_path_factory.mktemp("sandbox"), CONFIG_TOML, lock_seconds=LOCK) as sandbox:
        yield sandbox.url


@pytest.fixture
def live(server: str) -> Iterator[httpx.Client]:
    """An httpx client on the live sandbox, reset before and after the test."""
    with httpx.Client(base_url=server, timeout=5) as http:
        http.post("/_sandbox/reset")
        http.post("/_sandbox/config", json={"lock_seconds": LOCK})
        yield http
        http.post("/_sandbox/reset")


@pytest.mark.parametrize("when", ["before", "after"])
def test_live_drop_is_a_transport_error(live: httpx.Client, server: str, when: str) -> None:
    live.post("/_sandbox/faults", json={"drop": True, "when": when, "count": 1})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.post(f"{server}/api/event/cmp_test", json=QV, timeout=5)
    assert len(live.get("/_sandbox/events").json()["events"]) == (1 if when == "after" else 0)
    assert live.get("/_sandbox/requests").json()["requests"][0]["status"] is None
    # The server survives: the next event gets a real answer.
    assert live.post("/api/event/cmp_test", json={**QV, "transaction_id": "t2"}).status_code == 200


def test_live_late_answer_after_processing(live: httpx.Client, server: str) -> None:
    """A slow Pingtree: the caller times out, yet the event counted, and a quick retry is locked."""
    live.post("/_sandbox/config", json={"lock_seconds": 2.0})
    live.post("/_sandbox/faults", json={"delay_ms": 1500, "when": "after", "count": 1})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/api/event/cmp_test", json=QV, timeout=0.3)
    assert len(live.get("/_sandbox/events").json()["events"]) == 1
    retry = live.post("/api/event/cmp_test", json=QV)
    assert (retry.status_code, retry.json()["message"]) == (403, "Concurrent event in progress")


def test_live_realistic_delay_and_text_plain(live: httpx.Client) -> None:
    live.post("/_sandbox/faults", json={"delay_ms": 300, "when": "before"})
    started = time.monotonic()
    response = live.post(
        "/api/event/trigger",
        content=json.dumps({"cid": "cmp_test", **QV}),
        headers={"Content-Type": "text/plain", "User-Agent": "beacon/1"},
    )
    assert response.status_code == 200 and time.monotonic() - started >= 0.3
    assert live.get("/_sandbox/requests").json()["requests"][0]["headers"]["user-agent"] == "beacon/1"


def test_live_concurrent_duplicates_fire_once(live: httpx.Client, server: str) -> None:
    """Many threads, one worker: exactly one of 24 simultaneous identical events is accepted."""
    live.post("/_sandbox/config", json={"lock_seconds": 10})
    statuses: list[int] = []
    barrier = threading.Barrier(24)

    def send() -> None:
        with httpx.Client(timeout=10) as http:
            barrier.wait()
            statuses.append(http.post(f"{server}/api/event/cmp_test", json=SALE | {"amount": 9}).status_code)

    threads = [threading.Thread(target=send) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [403] * 23
    assert live.get("/_sandbox/stats").json()["accepted"] == 1


def test_main_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[relay]\nupstream_url = "http://x"\n[campaigns.c.events.e]\nconversion = "yes"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "server.sandbox", "--config", str(bad), "--port", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "campaigns.c.events.e.conversion" in proc.stderr
