"""``/metrics``: exact counts after known traffic, across gunicorn workers, and bounded labels."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import create_app
from server.build import version
from server.config import parse_config
from server.forwarder import DUPLICATE_MESSAGE, Forwarder
from server.relay import Relay as CoreRelay
from tests.conftest import RelayFactory, Sandbox

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str) -> Samples:
    """Every sample of a Prometheus text page, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def expected_counts(samples: Samples) -> dict[str, float]:
    """The figures the traffic in test_counts_after_known_traffic must produce."""
    ev = {"cid": "cmp_test", "event_id": "quote_viewed"}
    return {
        "received": value(samples, "pingtree_relay_events_received_total", cid="cmp_test"),
        "delivered_answers": value(
            samples, "pingtree_relay_events_accepted_total", **ev, outcome="delivered"
        ),
        "dead_answers": value(samples, "pingtree_relay_events_accepted_total", **ev, outcome="dead"),
        "bad_event": value(
            samples,
            "pingtree_relay_events_rejected_total",
            cid="cmp_test",
            event_id="unknown",
            reason="invalid_event_id",
        ),
        "bad_origin": value(
            samples,
            "pingtree_relay_events_rejected_total",
            cid="cmp_test",
            event_id="unknown",
            reason="origin",
        ),
        "delivered": value(samples, "pingtree_relay_events_delivered_total", **ev),
        "dead": value(samples, "pingtree_relay_events_dead_total", **ev),
        "latency_delivered": value(
            samples, "pingtree_relay_upstream_latency_seconds_count", state="delivered"
        ),
        "latency_dead": value(samples, "pingtree_relay_upstream_latency_seconds_count", state="dead"),
        "queue_depth": value(samples, "pingtree_relay_queue_depth"),
        "outbox_delivered": value(samples, "pingtree_relay_outbox_events", state="delivered"),
        "outbox_dead": value(samples, "pingtree_relay_outbox_events", state="dead"),
        # A constant, once per box however many workers add their files up.
        "build_info": value(samples, "pingtree_relay_build_info", version=version(), store="sqlite"),
    }


@pytest.mark.slow
def test_counts_after_known_traffic(relay_factory: RelayFactory, sandbox: Sandbox) -> None:
    """3 delivered, 2 refused (two reasons), 1 dead; every scrape, whichever worker answers, agrees."""
    orphan = Path(tempfile.gettempdir(), "pingtree-relay-metrics-999999999-left-by-a-kill")
    orphan.mkdir(exist_ok=True)
    relay = relay_factory(workers=2)
    assert relay.proc is not None
    assert not orphan.exists(), "serve must remove the metrics dirs of dead masters"
    [own_dir] = Path(tempfile.gettempdir()).glob(f"pingtree-relay-metrics-{relay.proc.pid}-*")
    for _ in range(3):
        r = relay.post({"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex})
        assert r.status_code == 200, r.text
    assert relay.post({"event_id": "no_such_event", "transaction_id": "t-1"}).status_code == 400
    assert (
        relay.post(
            {"event_id": "quote_viewed", "transaction_id": "t-2"}, origin="https://evil.example.net"
        ).status_code
        == 403
    )
    sandbox.fault(status=400, message="Campaign is paused", count=1)
    r = relay.post({"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex})
    assert r.status_code == 400 and r.json()["message"] == "Campaign is paused", r.text

    want = {
        "received": 6,
        "delivered_answers": 3,
        "dead_answers": 1,
        "bad_event": 1,
        "bad_origin": 1,
        "delivered": 3,
        "dead": 1,
        "latency_delivered": 3,
        "latency_dead": 1,
        "queue_depth": 0,
        "outbox_delivered": 3,
        "outbox_dead": 1,
        "build_info": 1,
    }
    # A fresh connection per scrape, so the two workers take turns answering.
    pages = [httpx.get(relay.url + "/metrics", headers={"Connection": "close"}, timeout=5) for _ in range(6)]
    for page in pages:
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/plain")
        assert expected_counts(scrape(page.text)) == want, page.text
    assert relay.stop() == 0
    assert not own_dir.exists(), "a clean stop removes this run's metrics dir"


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[[str, list[int]], Any]]:
    """In-process apps whose upstream answers with ``answers`` in turn (then 200); closed after."""
    apps: list[Any] = []

    def make(name: str, answers: list[int]) -> Any:
        config = parse_config(
            {
                "relay": {
                    "upstream_url": "http://pingtree.invalid",
                    "store": f"sqlite:///{tmp_path / name}.sqlite3",
                },
                "campaigns": {
                    "cmp_a": {
                        "allowed_origins": ["https://shop.example.com"],
                        "events": {"view": {"inline": True}, "sale": {"conversion": True}},
                    }
                },
            }
        )

        def upstream(request: httpx.Request) -> httpx.Response:
            status = answers.pop(0) if answers else 200
            return httpx.Response(status, json={"status": status, "message": "OK" if status == 200 else "No"})

        forwarder = Forwarder(config.relay.upstream_url, transport=httpx.MockTransport(upstream))
        app = create_app(config, relay=CoreRelay(config, forwarder=forwarder), start_delivery=False)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["relay"].close()


def test_labels_come_from_configuration_only(make_app: Callable[[str, list[int]], Any]) -> None:
    """Garbage campaign and event ids are folded into ``unknown``: input never makes a series."""
    client = make_app("a", []).test_client()
    origin = {"Origin": "https://shop.example.com"}
    for i in range(5):
        client.post(
            f"/api/event/cmp_random_{i}", json={"event_id": "view", "transaction_id": "t"}, headers=origin
        )
        client.post("/api/event/cmp_a", json={"event_id": f"ev_{i}", "transaction_id": "t"}, headers=origin)
    text = client.get("/metrics").text
    assert "cmp_random" not in text and "ev_0" not in text
    samples = scrape(text)
    assert value(samples, "pingtree_relay_events_received_total", cid="unknown") == 5
    assert (
        value(
            samples,
            "pingtree_relay_events_rejected_total",
            cid="unknown",
            event_id="unknown",
            reason="unknown_campaign",
        )
        == 5
    )
    assert (
        value(
            samples,
            "pingtree_relay_events_rejected_total",
            cid="cmp_a",
            event_id="unknown",
            reason="invalid_event_id",
        )
        == 5
    )


def test_single_process_registry_per_app(make_app: Callable[[str, list[int]], Any]) -> None:
    """Without a multiprocess dir each app has its own registry: two apps in one process coexist."""
    first, second = make_app("a", [503] * 100), make_app("b", [])
    origin = {"Origin": "https://shop.example.com"}
    assert (
        first.test_client()
        .post("/api/event/cmp_a", json={"event_id": "view", "transaction_id": "t"}, headers=origin)
        .status_code
        == 202
    )
    samples = scrape(first.test_client().get("/metrics").text)
    assert value(samples, "pingtree_relay_delivery_retries_total", cid="cmp_a", event_id="view") == 1
    assert value(samples, "pingtree_relay_queue_depth") == 1
    assert value(samples, "pingtree_relay_queue_oldest_pending_age_seconds") > 0
    assert value(samples, "pingtree_relay_sqlite_wal_bytes") > 0  # the event is in the WAL
    assert value(scrape(second.test_client().get("/metrics").text), "pingtree_relay_queue_depth") == 0


def test_build_info_and_duplicates_are_not_accepted(make_app: Callable[[str, list[int]], Any]) -> None:
    """build_info names the release and the store kind; a "Duplicate event" answer counts as refused."""
    client = make_app("d", []).test_client()
    origin = {"Origin": "https://shop.example.com"}
    body = {"event_id": "view", "transaction_id": "t-dup"}
    assert client.post("/api/event/cmp_a", json=body, headers=origin).status_code == 200
    again = client.post("/api/event/cmp_a", json=body, headers=origin)
    assert again.status_code == 400 and again.get_json()["message"] == DUPLICATE_MESSAGE
    samples = scrape(client.get("/metrics").text)
    assert value(samples, "pingtree_relay_build_info", version=version(), store="sqlite") == 1
    ev = {"cid": "cmp_a", "event_id": "view"}
    assert value(samples, "pingtree_relay_events_accepted_total", **ev, outcome="delivered") == 1
    assert value(samples, "pingtree_relay_events_accepted_total", **ev, outcome="duplicate") == 0
    assert value(samples, "pingtree_relay_events_rejected_total", **ev, reason="duplicate") == 1
    assert not [
        key
        for key in samples
        if key[0] == "pingtree_relay_events_accepted_total" and ("outcome", "duplicate") in key[1]
    ]


def test_sdk_requests_by_version_with_bounded_labels(make_app: Callable[[str, list[int]], Any]) -> None:
    """Each script request is counted by the build it got; a requested hash never becomes a label."""
    import re

    app = make_app("a", [])
    client = app.test_client()
    current = re.search(r"/sdk/cmp_a/v/([0-9a-f]{16})\.js", _pinned_path(app)).group(1)
    client.get("/sdk/cmp_a.js")
    assert (
        value(
            scrape(client.get("/metrics").text),
            "pingtree_relay_sdk_requests_total",
            cid="cmp_a",
            version="unknown",
            state="unknown",
        )
        == 0
    )  # present from the start, for alerts
    client.get("/sdk/cmp_a.js")
    client.get(f"/sdk/cmp_a/v/{current}.js")
    for i in range(20):
        client.get(f"/sdk/cmp_a/v/{i:016x}.js")
    text = client.get("/metrics").text
    samples = scrape(text)
    assert (
        value(samples, "pingtree_relay_sdk_requests_total", cid="cmp_a", version=current, state="stable") == 2
    )
    assert (
        value(samples, "pingtree_relay_sdk_requests_total", cid="cmp_a", version=current, state="current")
        == 1
    )
    assert (
        value(samples, "pingtree_relay_sdk_requests_total", cid="cmp_a", version="unknown", state="unknown")
        == 20
    )
    assert f"{3:016x}" not in text


def _pinned_path(app: Any) -> str:
    from server.sdk import snippet_tag

    return snippet_tag(app.extensions["relay"].config, "cmp_a", "https://r.example", integrity=True)


def _waiting_in(thread: threading.Thread, function: str, deadline: float) -> bool:
    """Whether ``thread`` is inside ``function`` before ``deadline`` (polled)."""
    while time.monotonic() < deadline and thread.is_alive():
        frame = sys._current_frames().get(thread.ident or 0)
        while frame is not None:
            if frame.f_code.co_name == function:
                return True
            frame = frame.f_back
        time.sleep(0.01)
    return False


def test_sqlite_lock_waits_are_counted(make_app: Callable[[str, list[int]], Any], tmp_path: Path) -> None:
    """An event stored while another process holds the SQLite file's write lock waits for it, and
    the wait is counted under ``insert``; the other operations are there at 0 from the start."""
    app = make_app("w", [])
    client = app.test_client()
    samples = scrape(client.get("/metrics").text)
    for operation in ("insert", "claim", "settle", "other"):
        assert ("pingtree_relay_sqlite_lock_waits_total", frozenset({("operation", operation)})) in samples
        assert value(samples, "pingtree_relay_sqlite_lock_wait_seconds_total", operation=operation) == 0
    holder = subprocess.Popen(  # another process, as a worker or the delivery engine would be
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(tmp_path / 'w.sqlite3')!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); sys.stdin.readline()\n"
            "c.execute('COMMIT')\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        answers: list[int] = []
        post = threading.Thread(
            target=lambda: answers.append(
                client.post(
                    "/api/event/cmp_a",
                    json={"event_id": "sale", "transaction_id": "t-wait", "amount": 5},
                    headers={"Origin": "https://shop.example.com"},
                ).status_code
            )
        )
        post.start()
        assert _waiting_in(post, "_busy_retry", time.monotonic() + 30), "the store did not wait for the lock"
    finally:
        holder.communicate("go\n", timeout=30)
    post.join(timeout=30)
    assert answers == [200]  # stored (after the wait), then delivered inline
    samples = scrape(client.get("/metrics").text)
    assert value(samples, "pingtree_relay_sqlite_lock_waits_total", operation="insert") == 1
    assert value(samples, "pingtree_relay_sqlite_lock_wait_seconds_total", operation="insert") > 0
    assert value(samples, "pingtree_relay_sqlite_lock_waits_total", operation="settle") == 0
