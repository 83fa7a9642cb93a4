"""Issue 4's "Must show": nothing accepted is lost, nothing is counted twice. Real processes only.

Relays are gunicorn processes (``relay_factory``) killed with SIGKILL or stopped with SIGTERM; the
upstream is the sandbox process, misbehaving on request. A double send is made visible by posting
Multi-Trigger events (``call_clicked``, which Pingtree counts every time) wherever the relay alone
must prevent it, and by counting the requests the sandbox received, not only the events it kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import load_config
from server.enrichment import conversion_date
from server.outbox import Record, Store, open_store
from tests.conftest import ROOT, Relay, Sandbox, campaigns_toml, wait_for

pytest_plugins = ["tests.redis_fixture"]

RelayFactory = Callable[..., Relay]


def new_txns(n: int, tag: str) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"txn_{tag}_{run}_{i}" for i in range(n)]


def store_of(relay: Relay) -> Store:
    """The relay's own outbox, opened the way ``pingtree-relay outbox`` opens it."""
    return open_store(load_config(relay.config_path).relay.store)


def outbox_cli(relay: Relay, *args: str) -> str:
    """``pingtree-relay outbox ARGS --config CFG`` in a subprocess; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "outbox", *args, "--config", str(relay.config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def events_by_txn(sandbox: Sandbox) -> Counter[str]:
    """How many times Pingtree counted each transaction's event."""
    return Counter(e["transaction_id"] for e in sandbox.events(cid="cmp_test"))


def requests_by_txn(sandbox: Sandbox) -> Counter[str]:
    """How many requests reached Pingtree per transaction, whatever it answered."""
    return Counter(r["body"].get("transaction_id") for r in sandbox.requests() if isinstance(r["body"], dict))


def drained(store: Store, expected: int) -> bool:
    """Everything accepted has an outcome (nothing pending) and every record is there."""
    counts = store.stats().counts
    return counts["pending"] == 0 and counts["delivered"] + counts["dead"] >= expected


def post_many(
    relays: list[Relay],
    bodies: Iterable[dict[str, Any]],
    *,
    threads: int = 8,
    after_each: Callable[[int], None] | None = None,
) -> list[tuple[dict[str, Any], int | None]]:
    """Post ``bodies`` round-robin to ``relays`` from a thread pool: ``(body, status or None)``."""

    def one(item: tuple[int, dict[str, Any]]) -> tuple[dict[str, Any], int | None]:
        i, body = item
        try:
            status: int | None = relays[i % len(relays)].post(body).status_code
        except httpx.TransportError:
            status = None  # that relay died: no answer (the event may or may not have been stored)
        if after_each is not None:
            after_each(i)
        return body, status

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, enumerate(bodies)))


# --- a. an outage, then a crash: nothing lost, nothing doubled, original conversion_date -----------


def test_outage_then_sigkill_then_restart_delivers_everything_once(
    relay_factory: RelayFactory, sandbox: Sandbox
) -> None:
    relay = relay_factory(inline_timeout=0.5, upstream_timeout=1.5, lease_seconds=2)
    sandbox.fault(status=500)  # Pingtree down until cleared
    txns = new_txns(40, "outage")
    windows: dict[str, tuple[float, float]] = {}

    def post(txn: str) -> int:
        before = time.time()
        status = relay.post({"event_id": "call_clicked", "transaction_id": txn}).status_code
        windows[txn] = (before, time.time())
        return status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, txns))
    assert statuses == [202] * 40, statuses
    last_post = max(after for _, after in windows.values())
    wait_for(
        lambda: sum(requests_by_txn(sandbox)[t] >= 2 for t in txns) >= 10,
        timeout=20,
        message="background retries against the failing upstream",
    )
    relay.kill()  # SIGKILL: master and workers, mid-retry, no clean-up
    assert events_by_txn(sandbox) == Counter()
    # Not synchronisation: a delivery-time conversion_date must be seconds away from the receipt
    # time for the assertion below to be able to fail.
    time.sleep(max(0.0, last_post + 2.2 - time.time()))
    sandbox.clear_faults()
    relay.start()
    store = store_of(relay)
    wait_for(lambda: drained(store, 40), timeout=30, message="the backlog to drain after the restart")

    events = {e["transaction_id"]: e for e in sandbox.events(cid="cmp_test")}
    assert events_by_txn(sandbox) == Counter({t: 1 for t in txns})
    for txn in txns:
        stamp = events[txn]["body"]["conversion_date"]
        before, after = windows[txn]
        receipt = {conversion_date(s, "EST") for s in range(int(before), int(after) + 1)}
        assert stamp in receipt, f"{txn}: conversion_date {stamp} is not its receipt time {receipt}"
    assert all(r.state == "delivered" for r in store.find(limit=100))
    store.close()


# --- b. Pingtree processed it but answered too late --------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"delay_ms": 1500, "when": "after", "count": 1}, id="late-answer"),
        pytest.param({"drop": True, "when": "after", "count": 1}, id="dropped-answer"),
    ],
)
def test_a_processed_but_unanswered_event_is_counted_once(
    relay_factory: RelayFactory, sandbox: Sandbox, fault: dict[str, Any]
) -> None:
    relay = relay_factory(inline_timeout=0.4, upstream_timeout=0.6, lease_seconds=2)
    sandbox.fault(**fault)
    [txn] = new_txns(1, "late")
    response = relay.post({"event_id": "form_submitted", "transaction_id": txn})
    assert response.status_code == 202, response.text
    uuid_ = "cmp_test:" + response.json()["data"]["event_uuid"]  # the store's id: scoped to the campaign
    store = store_of(relay)
    record = wait_for(
        lambda: (r := store.get(uuid_)) is not None and r.state != "pending" and r,
        timeout=20,
        message="an outcome for the late-answered event",
    )
    assert events_by_txn(sandbox)[txn] == 1  # Pingtree counted it once
    assert requests_by_txn(sandbox)[txn] >= 2  # although the relay had to send it again
    assert (record.state, record.last_status, record.uncertain) == ("delivered", 400, True)
    assert record.last_error == "duplicate after an attempt with unknown outcome"
    assert f"{uuid_} " in outbox_cli(relay, "list", "--state", "delivered")
    assert json.loads(outbox_cli(relay, "stats"))["counts"] == {"pending": 0, "delivered": 1, "dead": 0}
    store.close()


# --- c. many nodes: two relays on one Redis, one killed mid-load -------------------------------


@pytest.mark.redis
def test_two_relays_on_one_redis_survive_losing_one(
    relay_factory: RelayFactory, sandbox: Sandbox, redis_url: str
) -> None:
    keys = {
        "store": redis_url,
        "inline_concurrency": 0,
        "max_in_flight": 8,
        "lease_seconds": 1,
        "upstream_timeout": 0.8,
    }
    a, b = relay_factory(**keys), relay_factory(**keys)
    sandbox.fault(delay_ms=100)  # every delivery takes a while: some are in flight at the kill
    killed = threading.Event()

    def maybe_kill(i: int) -> None:
        if i == 40 and not killed.is_set():
            killed.set()
            a.kill()

    txns = new_txns(100, "two")
    results = post_many(
        [a, b], ({"event_id": "form_submitted", "transaction_id": t} for t in txns), after_each=maybe_kill
    )
    accepted = [body["transaction_id"] for body, status in results if status == 202]
    refused = [body for body, status in results if status is None]
    assert killed.is_set() and refused, "relay A should have died during the load"
    assert all(status in (202, None) for _, status in results), results
    assert len(accepted) >= 60
    sandbox.clear_faults()
    store = open_store(redis_url)
    wait_for(lambda: drained(store, len(accepted)), timeout=30, message="relay B to finish A's work")

    # A post whose answer died with A may have been stored before the kill: it is then delivered
    # too (the relay had accepted it; only the answer was lost), and once, like the others.
    lost_answers = {body["transaction_id"] for body in refused}
    events = events_by_txn(sandbox)
    assert all(events[t] == 1 for t in accepted), {t: events[t] for t in accepted if events[t] != 1}
    assert set(events) <= set(accepted) | lost_answers and max(events.values()) == 1, events
    records = {r.transaction_id: r for r in store.find(limit=1000)}
    assert set(accepted) <= set(records) <= set(accepted) | lost_answers
    assert {r.state for r in records.values()} == {"delivered"}  # a double claim would end dead
    requests = requests_by_txn(sandbox)
    resent = [t for t in records if requests[t] > 1 and not records[t].uncertain]
    assert not resent, f"sent twice without a lost attempt: {resent[:5]}"
    # Only what A had in flight when it died may be uncertain: its engine holds at most 8.
    uncertain = [t for t in records if records[t].uncertain]
    assert len(uncertain) <= 8, f"{len(uncertain)} uncertain records: leases were not respected"
    store.close()


@pytest.mark.redis
def test_a_redis_restart_stalls_nothing(
    relay_factory: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    from tests.redis_fixture import RedisServer, redis_binary  # here: the plugin must load it first

    server = RedisServer(redis_binary(), tmp_path).start()
    try:
        # One worker with one inline slot: a slot leaked by a failed store call would show at once.
        relay = relay_factory(store=server.url, workers=1, inline_concurrency=1, inline_timeout=1.0)
        server.stop()
        wait_for(lambda: "claim failed" in relay.log(), timeout=10, message="a claim to fail")
        [t0, t1, t2] = new_txns(3, "restart")
        down = relay.post({"event_id": "form_submitted", "transaction_id": t0})
        assert down.status_code >= 500, down.text  # never a 202: nothing was stored
        server.start()
        up = relay.post({"event_id": "form_submitted", "transaction_id": t1})
        assert up.status_code == 200, up.text  # the inline slot came back
        sandbox.fault(status=500, count=1)
        assert relay.post({"event_id": "form_submitted", "transaction_id": t2}).status_code == 202
        wait_for(
            lambda: events_by_txn(sandbox)[t2] == 1,
            timeout=10,
            message="background delivery after the Redis restart",
        )
        assert events_by_txn(sandbox)[t0] == 0
    finally:
        server.stop()


# --- d. several gunicorn workers on one SQLite file --------------------------------------------


def test_many_workers_on_one_sqlite_file(relay_factory: RelayFactory, sandbox: Sandbox) -> None:
    relay = relay_factory(workers=4, inline_timeout=1.0)
    sandbox.fault(status=503, count=40)  # some go to the background, claimed by all four workers
    txns = new_txns(200, "workers")
    results = post_many(
        [relay], ({"event_id": "call_clicked", "transaction_id": t} for t in txns), threads=12
    )
    assert Counter(status for _, status in results).keys() <= {200, 202}, Counter(s for _, s in results)
    store = store_of(relay)
    wait_for(lambda: drained(store, 200), timeout=30, message="all 200 events delivered")

    assert events_by_txn(sandbox) == Counter({t: 1 for t in txns})  # Multi-Trigger: any resend shows
    assert {r.state for r in store.find(limit=500)} == {"delivered"}
    import sqlite3

    with sqlite3.connect(relay.store_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert httpx.get(relay.url + "/healthz", timeout=5).status_code == 200  # and it still answers
    store.close()


# --- e. idempotency ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["body", "header"])
def test_the_same_event_uuid_twice_is_forwarded_once(
    relay_factory: RelayFactory, sandbox: Sandbox, how: str
) -> None:
    relay = relay_factory()
    [txn] = new_txns(1, "uuid")
    key = f"evt-{uuid.uuid4().hex}"
    body: dict[str, Any] = {"event_id": "call_clicked", "transaction_id": txn}  # Multi-Trigger
    headers: dict[str, str] = {}
    if how == "body":
        body["event_uuid"] = key
    else:
        headers["Idempotency-Key"] = key
    first = relay.post(body, headers=headers)
    second = relay.post(body, headers=headers)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json() == second.json() and first.json()["data"]["event_uuid"] == key
    assert events_by_txn(sandbox)[txn] == 1 and requests_by_txn(sandbox)[txn] == 1


def test_one_lead_one_event_posted_twice_at_once_is_delivered_once(
    relay_factory: RelayFactory, sandbox: Sandbox
) -> None:
    relay = relay_factory()
    for txn in new_txns(5, "race"):
        barrier = threading.Barrier(2)

        def post(_: int, txn: str = txn, barrier: threading.Barrier = barrier) -> httpx.Response:
            barrier.wait()
            return relay.post({"event_id": "form_submitted", "transaction_id": txn})

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(post, range(2)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses in ([200, 202], [200, 400]), [r.text for r in answers]
        assert len({r.json()["data"]["event_uuid"] for r in answers}) == 1  # the same event, twice
        assert events_by_txn(sandbox)[txn] == 1 and requests_by_txn(sandbox)[txn] == 1


# --- f. SIGTERM is graceful ----------------------------------------------------------------------


def test_sigterm_while_delivering_then_restart_delivers_everything_once(
    relay_factory: RelayFactory, sandbox: Sandbox
) -> None:
    # A long lease: were a lease left behind by the shutdown, the restart would wait it out and time out.
    relay = relay_factory(inline_concurrency=0, max_in_flight=2, lease_seconds=60)
    sandbox.fault(delay_ms=700)
    txns = new_txns(20, "sigterm")
    results = post_many([relay], ({"event_id": "call_clicked", "transaction_id": t} for t in txns))
    assert {status for _, status in results} == {202}
    wait_for(lambda: len(sandbox.requests()) >= 2, timeout=10, message="deliveries in flight")
    assert relay.stop() == 0  # SIGTERM: finish what is in flight, give the rest back
    store = store_of(relay)
    leftover = store.find(state="pending", limit=100)
    assert leftover and all(r.lease_owner is None for r in leftover), [r.lease_owner for r in leftover]
    assert all(r.attempts == 0 for r in leftover)  # released claims do not count as attempts
    sandbox.clear_faults()
    relay.start()
    wait_for(lambda: drained(store, 20), timeout=20, message="the rest delivered after the restart")
    assert events_by_txn(sandbox) == Counter({t: 1 for t in txns})
    assert requests_by_txn(sandbox) == Counter({t: 1 for t in txns})
    store.close()


# --- g. dead letters -----------------------------------------------------------------------------


def test_dead_letters_can_be_listed_retried_and_purged(
    relay_factory: RelayFactory, sandbox: Sandbox, pages_port: int
) -> None:
    # relay_only exists in the relay's campaign but not in the sandbox's: Pingtree answers 400.
    relay = relay_factory(
        campaigns_toml(pages_port) + "\n[campaigns.cmp_test.events.relay_only]\ninline = true\n"
    )
    [txn] = new_txns(1, "dead")
    response = relay.post({"event_id": "relay_only", "transaction_id": txn})
    assert response.status_code == 400, response.text
    uuid_ = "cmp_test:" + response.json()["data"]["event_uuid"]  # the store's id: scoped to the campaign
    listed = outbox_cli(relay, "list", "--state", "dead")
    assert uuid_ in listed and "400 Invalid event_id for this campaign" in listed
    assert json.loads(outbox_cli(relay, "stats"))["counts"]["dead"] == 1

    assert outbox_cli(relay, "retry", "--all").strip() == "re-queued 1 dead letters"
    store = store_of(relay)

    def dead_again() -> Record | None:
        r = store.get(uuid_)
        return r if r is not None and r.state == "dead" and r.attempts == 2 else None

    wait_for(dead_again, timeout=15, message="the re-queued dead letter to be re-sent")
    assert requests_by_txn(sandbox)[txn] == 2
    assert (
        outbox_cli(relay, "purge", "--state", "dead", "--all").strip() == "purged 1 dead events (all of them)"
    )
    assert store.get(uuid_) is None and outbox_cli(relay, "list") == ""
    store.close()


def test_an_event_older_than_max_age_is_given_up(relay_factory: RelayFactory, sandbox: Sandbox) -> None:
    relay = relay_factory(max_age_hours=1.0 / 3600, inline_timeout=0.5)  # one second
    sandbox.fault(status=500)
    [txn] = new_txns(1, "old")
    response = relay.post({"event_id": "form_submitted", "transaction_id": txn})
    assert response.status_code == 202
    store = store_of(relay)
    record = wait_for(
        lambda: (
            (r := store.get("cmp_test:" + response.json()["data"]["event_uuid"])) and r.state == "dead" and r
        ),
        timeout=15,
        message="the event to be given up",
    )
    assert record.last_error.startswith("gave up after ") and "500" in record.last_error
    assert events_by_txn(sandbox)[txn] == 0
    store.close()
