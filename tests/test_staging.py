"""Staging origins: test traffic is validated, stored and answered, flagged everywhere, and never
reaches the real upstream. Real relays and sandboxes on loopback; the router's unit tests first."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx

from server.attribution import CLICK_IDS
from server.config import parse_config
from server.forwarder import Attempt
from server.staging import TEST_FLAG, StagingRouter, mark
from tests.conftest import Sandbox, campaigns_toml, wait_for

STAGING = "https://acme-roofing.webflow.io"


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[dict[str, Any]] = []

    def send(self, cid: str, body: dict[str, Any], *, timeout: float | None = None) -> Attempt:
        self.sent.append(body)
        return Attempt(200, answer={"status": 200, "message": self.name, "data": {}})


def test_router_sends_real_events_to_the_real_upstream_only() -> None:
    config = parse_config({"relay": {"upstream_url": "http://127.0.0.1:1"}, "campaigns": {}})
    real, staging = Recorder("real"), Recorder("staging")
    router = StagingRouter(config, real, staging)
    router.send("c", {"event_id": "e"})
    router.send("c", mark({"event_id": "e"}))
    assert real.sent == [{"event_id": "e"}]
    assert staging.sent == [{"event_id": "e"}]  # the flag never leaves the relay


def test_router_without_a_staging_upstream_answers_as_the_sandbox() -> None:
    config = parse_config(
        {
            "relay": {"upstream_url": "http://127.0.0.1:1"},
            "campaigns": {"c": {"events": {"sale": {"conversion": True}}}},
        }
    )
    real = Recorder("real")
    attempt = StagingRouter(config, real, None).send("c", mark({"event_id": "sale", "transaction_id": "t"}))
    assert real.sent == []
    assert attempt.status == 200 and attempt.answer is not None
    data = attempt.answer["data"]
    assert (
        data["test"] is True and data["conversion"] is True and data["conversion_id"].startswith("conv_test_")
    )
    assert attempt.answer["message"] == "Event triggered successfully" and data["pid"] == "organic"


def staging_campaigns(pages_port: int) -> str:
    return campaigns_toml(pages_port).replace(
        "[campaigns.cmp_test]\n", '[campaigns.cmp_test]\nstaging_origins = ["https://*.webflow.io"]\n', 1
    )


def event(t: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": "sale_completed",
        "transaction_id": t,
        "amount": 45,
        "event_uuid": uuid.uuid4().hex,
        **fields,
    }


def test_staging_event_is_stored_flagged_answered_as_test_and_never_forwarded(
    relay_factory: Any,
    pages_port: int,
    sandbox: Sandbox,
) -> None:
    # *.webflow.io is in allowed_origins too: staging_origins wins (test traffic).
    relay = relay_factory(staging_campaigns(pages_port), admin_token="tok-0123456789abcdef")
    t = "txn_" + uuid.uuid4().hex[:10]
    r = relay.post(event(t, gclid="g1"), origin=STAGING)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["test"] is True and r.json()["data"]["conversion_id"].startswith("conv_test_")
    assert r.headers["Access-Control-Allow-Origin"] == STAGING
    # A replay of the same event_uuid is still marked.
    again = relay.post(json.loads(r.request.content), origin=STAGING)
    assert again.json()["data"]["test"] is True
    # A real origin's event for the same transaction is not collapsed into the test one.
    real = relay.post(event(t), origin="https://www.example.com")
    assert real.status_code == 200 and "test" not in real.json()["data"]
    arrived = wait_for(lambda: sandbox.events(transaction_id=t), message="the real event")
    assert len(arrived) == 1 and len(sandbox.requests()) == 1  # only the real one reached "Pingtree"

    # Flagged in the dashboard's feed, the metrics and the logs.
    with httpx.Client(base_url=relay.url, timeout=10) as client:  # closed: its socket would leak
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/admin/login").text)
        assert token, "no CSRF token on the login page"
        client.post("/admin/login", data={"token": "tok-0123456789abcdef", "csrf_token": token.group(1)})
        rows = client.get("/admin/feed.json", params={"transaction_id": t}).json()["events"]
    assert sorted(row["test"] for row in rows) == [False, True], rows
    metrics = httpx.get(relay.url + "/metrics", timeout=10).text
    assert (
        'pingtree_relay_test_events_total{cid="cmp_test",event_id="sale_completed",outcome="delivered"} 1.0'
        in metrics
    )
    assert 'pingtree_relay_events_delivered_total{cid="cmp_test",event_id="sale_completed"} 1.0' in metrics
    lines = [
        json.loads(line) for line in Path(relay.log_path).read_text().splitlines() if line.startswith("{")
    ]
    assert any(line.get("test") is True and line.get("event") == "accepted" for line in lines)


def test_staging_upstream_url_receives_test_events_and_pingtree_none(
    relay_factory: Any,
    pages_port: int,
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "staging-sandbox.toml"
    cfg.write_text('[relay]\nupstream_url = "http://127.0.0.1:1"\n' + campaigns_toml(pages_port))
    staging = Sandbox(["sandbox", "--config", str(cfg)], tmp_path / "staging-sandbox.log").start()
    try:
        relay = relay_factory(staging_campaigns(pages_port), staging_upstream_url=staging.url)
        t = "txn_" + uuid.uuid4().hex[:10]
        r = relay.post(event(t, **{CLICK_IDS[0]: "g"}), origin=STAGING)
        assert r.status_code == 200 and r.json()["data"]["test"] is True
        got = wait_for(lambda: staging.events(transaction_id=t), message="the staging upstream")
        assert got[0]["body"]["gclid"] == "g" and TEST_FLAG not in got[0]["body"]
        assert r.json()["data"]["conversion_id"] == got[0]["answer"]["data"]["conversion_id"]
        assert sandbox.requests() == []
    finally:
        staging.stop()


def test_staging_origins_allow_preflight_and_others_stay_refused(relay_factory: Any, pages_port: int) -> None:
    relay = relay_factory(staging_campaigns(pages_port).replace('"https://*.webflow.io", ', ""))
    ok = httpx.options(relay.url + "/api/event/cmp_test", headers={"Origin": STAGING}, timeout=10)
    assert ok.status_code == 204
    bad = relay.post(event("t-1"), origin="https://evil.example.net")
    assert bad.status_code == 403 and bad.json()["message"] == "Origin not allowed"
