"""Relay.accept when the store fails *after* the event is in it, on both stores.

The relay runs in process (its Flask test client) with a real store and the real sandbox as its
upstream; only the fault is injected: the store's ``finish`` raises the way a full disk or a
dropped Redis connection does, for the first ``failures`` calls.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from server import create_app
from server.admin.present import feed_row
from server.config import parse_config
from server.forwarder import Forwarder
from server.outbox import Store, open_store
from server.relay import Relay
from tests.conftest import Sandbox, wait_for

pytest_plugins = ["tests.redis_fixture"]


class FinishFails:
    """A real store whose ``finish`` raises for its first ``failures`` calls; the rest is the store's."""

    def __init__(self, store: Store, error: Exception, failures: int) -> None:
        self._store, self._error, self.failures = store, error, failures

    def _fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise self._error

    def finish(self, *args: Any, **kwargs: Any) -> bool:
        self._fail()
        return self._store.finish(*args, **kwargs)

    def finish_many(self, *args: Any, **kwargs: Any) -> Any:
        self._fail()
        return self._store.finish_many(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"sqlite:///{tmp_path / 'outbox.sqlite3'}"


@pytest.fixture
def make_client(store_url: str, sandbox: Sandbox) -> Iterator[Any]:
    relays: list[Relay] = []

    def make(failures: int) -> tuple[Any, Store]:
        config = parse_config(
            {
                "relay": {
                    "upstream_url": sandbox.url,
                    "store": store_url,
                    "retry_base_seconds": 0.05,
                    "inline_timeout": 5.0,
                    "rate_limits": {"per_ip": "", "per_campaign": ""},
                },
                "campaigns": {
                    "cmp_test": {
                        "allowed_origins": ["https://www.example.com"],
                        "events": {"quote_viewed": {"inline": True}},
                    }
                },
            }
        )
        real = open_store(store_url)
        error = (
            sqlite3.OperationalError("database or disk is full")
            if store_url.startswith("sqlite")
            else redis.ConnectionError("Connection reset by peer")
        )
        store = FinishFails(real, error, failures)
        relay = Relay(config, store=store)  # type: ignore[arg-type]
        relays.append(relay)
        return create_app(config, relay=relay, start_delivery=False).test_client(), real

    yield make
    for relay in relays:
        relay.close()


@pytest.mark.parametrize("failures", [1, 99], ids=["once", "every-time"])
def test_a_stored_event_is_202_when_the_write_after_the_attempt_fails(
    make_client: Any, sandbox: Sandbox, failures: int
) -> None:
    client, store = make_client(failures)
    uid, t = f"id_{uuid.uuid4().hex[:16]}", f"txn_{uuid.uuid4().hex}"
    response = client.post(
        "/api/event/cmp_test",
        json={"event_id": "quote_viewed", "transaction_id": t, "event_uuid": uid},
        headers={"Origin": "https://www.example.com"},
    )
    assert response.status_code == 202, response.text
    assert response.json["type"] == "queued" and response.json["data"]["event_uuid"] == uid
    assert len(sandbox.events(transaction_id=t)) == 1  # the inline attempt did reach Pingtree
    if failures == 1:
        # The outcome was recorded as unknown at once (the 30 s lease has not expired): the retry
        # goes out uncertain, so Pingtree's "Duplicate event" answer to it counts as delivered.
        client.application.extensions["relay"].start_delivery()
        delivered = wait_for(
            lambda: (r := store.get(f"cmp_test:{uid}")) and r.state == "delivered" and r,
            message="the uncertain retry settled as delivered",
        )
        assert (
            delivered.uncertain and delivered.last_error == "duplicate after an attempt with unknown outcome"
        )
        assert len(sandbox.events(transaction_id=t)) == 1  # counted once
    else:
        # Nothing could be written: the lease stays, and when it expires the claim marks the
        # record uncertain (the store contract test checks that part).
        record = store.get(f"cmp_test:{uid}")
        assert record is not None and record.state == "pending"
        assert record.lease_owner is not None and not record.uncertain


def test_a_200_whose_body_says_400_is_refused_not_delivered(tmp_path: Path) -> None:
    # The API reference's answer schema has its own status (a string) and type ("success" or
    # "error"): when they contradict the HTTP status, the body is believed, so a failed event is
    # dead-lettered where an operator sees it, and the page is told what Pingtree said.
    answer = {"status": "400", "type": "error", "message": "revenue is required"}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    config = parse_config(
        {
            "relay": {
                "upstream_url": "http://127.0.0.1:9",
                "store": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
                "rate_limits": {"per_ip": "", "per_campaign": ""},
            },
            "campaigns": {
                "cmp_test": {
                    "allowed_origins": ["https://www.example.com"],
                    "events": {"quote_viewed": {"inline": True}},
                }
            },
        }
    )
    relay = Relay(config, forwarder=Forwarder(config.relay.upstream_url, transport=transport))
    deliveries: list[dict[str, Any]] = []
    relay.observers.add(lambda kind, fields: deliveries.append(fields) if kind == "delivery" else None)
    try:
        client = create_app(config, relay=relay, start_delivery=False).test_client()
        uid = f"id_{uuid.uuid4().hex[:16]}"
        event = {"event_id": "quote_viewed", "transaction_id": "txn_1", "event_uuid": uid}
        for _ in range(2):  # the attempt, then the replay of its stored outcome
            response = client.post(
                "/api/event/cmp_test", json=event, headers={"Origin": "https://www.example.com"}
            )
            assert response.status_code == 400, response.text
            assert response.json["message"] == "revenue is required"
        record = relay.store.get(f"cmp_test:{uid}")
        assert record is not None and record.state == "dead"
        assert record.last_error == "400 revenue is required"
        # What logs, metrics and the dashboard show is the status Pingtree meant, never "200, dead".
        assert [(d["state"], d["status"], d["http_status"]) for d in deliveries] == [("dead", 400, 200)]
        assert feed_row(record)["status"] == 400
    finally:
        relay.close()


def test_the_app_keeps_ensure_syncs_answer_but_never_hands_an_async_view_back_as_it_is(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "relay": {"upstream_url": "http://127.0.0.1:9", "store": f"sqlite:///{tmp_path / 'o.sqlite3'}"},
            "campaigns": {"cmp_test": {"allowed_origins": ["https://www.example.com"]}},
        }
    )
    app = create_app(config, start_delivery=False)
    try:

        def view() -> str:
            return "ok"

        async def async_view() -> str:
            return "ok"

        assert app.ensure_sync(view) is view
        assert app.ensure_sync(view) is view  # kept
        # Flask wraps an async view, or refuses it without its "async" extra: never as it is.
        for _ in range(2):
            try:
                wrapped = app.ensure_sync(async_view)
            except RuntimeError as exc:
                assert "async" in str(exc)
            else:
                assert wrapped is not async_view
        # Past the cache's limit (callables made per call) every answer is still worked out.
        for _ in range(app._SYNC_CACHE_LIMIT + 5):  # type: ignore[attr-defined]

            def made() -> None:
                pass

            assert app.ensure_sync(made) is made
        assert len(app._sync) <= app._SYNC_CACHE_LIMIT  # type: ignore[attr-defined]
    finally:
        app.extensions["relay"].close()
