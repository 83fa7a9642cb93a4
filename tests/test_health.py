"""/readyz reports the store and the upstream; a store that fails makes the endpoint say "retry" (503).

In-process apps on real SQLite files; the upstream is an ``httpx.MockTransport`` (a unit of the
forwarder's bookkeeping, not of delivery, which the durability tests drive over real servers).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask

from server import create_app
from server.config import parse_config
from server.forwarder import Forwarder
from server.outbox import Record
from server.outbox.sqlite import SQLiteStore
from server.relay import Relay

ORIGIN = "https://www.example.com"


def config(tmp_path: Path) -> Any:
    return parse_config(
        {
            "relay": {
                "upstream_url": "http://upstream.invalid",
                "store": f"sqlite:///{tmp_path / 'o.sqlite3'}",
            },
            "campaigns": {
                "cmp_h": {"allowed_origins": [ORIGIN], "events": {"quote_viewed": {"inline": True}}}
            },
        }
    )


_relays: list[Relay] = []


@pytest.fixture(autouse=True)
def _close_relays() -> Any:
    """Stop each test's delivery threads: retries must not outlive (and log after) their test."""
    yield
    while _relays:
        _relays.pop().close()


def app_with(tmp_path: Path, status: int, *, store: Any = None) -> Flask:
    cfg = config(tmp_path)
    answer = {"status": status, "type": "success" if status < 400 else "error", "message": "m", "data": {}}
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=answer))
    relay = Relay(cfg, store=store, forwarder=Forwarder(cfg.relay.upstream_url, transport=transport))
    _relays.append(relay)
    return create_app(cfg, relay=relay, start_delivery=False)


def post(app: Flask, txn: str = "t-1") -> Any:
    return app.test_client().post(
        "/api/event/cmp_h",
        data=json.dumps({"event_id": "quote_viewed", "transaction_id": txn}),
        headers={"Origin": ORIGIN, "Content-Type": "text/plain"},
    )


def test_readyz_before_any_attempt(tmp_path: Path) -> None:
    body = app_with(tmp_path, 200).test_client().get("/readyz").get_json()
    assert body["status"] == "ok" and body["store"] == "ok"
    assert body["upstream"]["state"] == "unknown"


@pytest.mark.parametrize("status, state, code", [(200, "ok", 200), (500, "failing", 202)])
def test_readyz_reports_the_latest_upstream_answer(
    tmp_path: Path, status: int, state: str, code: int
) -> None:
    app = app_with(tmp_path, status)
    assert post(app).status_code == code
    answer = app.test_client().get("/readyz")
    body = answer.get_json()
    # Upstream trouble is reported but leaves the relay ready: it queues.
    assert answer.status_code == 200 and body["status"] == "ok"
    assert body["upstream"]["state"] == state and body["upstream"]["detail"] == f"HTTP {status}"
    assert body["queue"]["counts"]["pending"] == (1 if status == 500 else 0)


class FailingStore(SQLiteStore):
    """A real SQLite store whose disk has just filled up."""

    def add(self, record: Record, *, owner: str | None, lease: float) -> tuple[Record, bool]:
        raise sqlite3.OperationalError("database or disk is full")


def test_a_store_that_fails_answers_503_with_retry_after(tmp_path: Path) -> None:
    app = app_with(tmp_path, 200, store=FailingStore(str(tmp_path / "full.sqlite3")))
    for _ in range(12):  # more than inline_concurrency: a failed add must give its inline slot back
        answer = post(app)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "5"
        body = answer.get_json()
        assert body["type"] == "error" and "retry later" in body["message"]
        assert "disk" not in answer.get_data(as_text=True)  # no internals in the answer
    relay: Relay = app.extensions["relay"]
    assert relay._inline.free == relay.config.relay.inline_concurrency  # the slots are all free again
