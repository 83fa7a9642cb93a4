"""One contract, every backend: the outbox's ``Store`` behaves the same on SQLite and on Redis.

Each test runs once per backend (``store`` is parametrized): SQLite on a file in ``tmp_path``,
Redis on the session's real ``redis-server`` (see ``tests/redis_fixture.py``).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.outbox import Outcome, Record, Store, open_store, scoped_id
from server.outbox.redis import RedisStore
from server.outbox.sqlite import SQLiteStore
from tests.conftest import wait_for
from tests.store_counting import count_store_writes

pytest_plugins = ["tests.redis_fixture"]

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens more handles on one store (another process or machine would have its own)."""
    opened: list[Store] = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    else:
        url = request.getfixturevalue("redis_url")

    def make() -> Store:
        store = open_store(url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    return store_factory()


def rec(
    *,
    id: str | None = None,
    cid: str = "cmp_test",
    event_id: str = "form_submitted",
    txn: str | None = None,
    dedupe: bool = True,
    received_at: float | None = None,
    payload: dict[str, Any] | None = None,
) -> Record:
    """A new record; its dedupe key is the relay's ``cid|transaction_id|event_id`` unless ``dedupe=False``."""
    txn = txn or f"txn_{uuid.uuid4().hex[:12]}"
    return Record(
        id=id or uuid.uuid4().hex,
        cid=cid,
        event_id=event_id,
        transaction_id=txn,
        payload=payload or {"transaction_id": txn, "event_id": event_id, "sub1": "é✓", "amount": 12.5},
        received_at=time.time() if received_at is None else received_at,
        dedupe_key=f"{cid}|{txn}|{event_id}" if dedupe else None,
    )


def finish(store: Store, record: Record, owner: str, state: str, **kw: Any) -> bool:
    args: dict[str, Any] = {
        "next_at": time.time(),
        "status": None,
        "answer": None,
        "error": None,
        "uncertain": False,
        "latency_ms": None,
    }
    args.update(kw)
    return store.finish(record.id, owner, state=state, **args)


def make_dead(store: Store, record: Record, error: str = "400 Invalid event_id for this campaign") -> None:
    store.add(record, owner="w", lease=30)
    assert finish(store, record, "w", "dead", status=400, answer={"message": "no"}, error=error)


# --- add and get ------------------------------------------------------------------------------------


def test_add_then_get_round_trips_every_field(store: Store) -> None:
    r = rec(received_at=1_700_000_000.123456, payload={"a": [1, {"b": None}], "s": "é✓", "f": 0.1})
    stored, created = store.add(r, owner=None, lease=30)
    assert created and stored.state == "pending" and stored.attempts == 0 and stored.lease_owner is None
    got = store.get(r.id)
    assert got is not None
    assert (got.id, got.cid, got.event_id, got.transaction_id, got.dedupe_key) == (
        r.id,
        r.cid,
        r.event_id,
        r.transaction_id,
        r.dedupe_key,
    )
    assert got.payload == {"a": [1, {"b": None}], "s": "é✓", "f": 0.1}
    assert got.received_at == 1_700_000_000.123456
    assert (got.state, got.attempts, got.lease_owner, got.uncertain) == ("pending", 0, None, False)
    assert (got.last_status, got.last_answer, got.last_error, got.delivered_at, got.latency_ms) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert got.next_at <= time.time() and got.display_state() == "queued"
    assert store.get("no-such-id") is None


def test_add_with_an_owner_leases_it_for_the_inline_attempt(store: Store) -> None:
    r = rec()
    before = time.time()
    stored, created = store.add(r, owner="inline-1", lease=30)
    assert created and stored.attempts == 1 and stored.lease_owner == "inline-1"
    got = store.get(r.id)
    assert got is not None and got.lease_owner == "inline-1" and got.attempts == 1
    assert before + 29 <= got.next_at <= time.time() + 31
    assert got.display_state() == "delivering"
    assert store.claim("other", 10, 30) == []  # leased: nobody else may take it


def test_add_is_idempotent_on_id(store: Store) -> None:
    r = rec()
    store.add(r, owner=None, lease=30)
    again = rec(id=r.id, txn="another", payload={"different": True})
    stored, created = store.add(again, owner="x", lease=30)
    assert not created and stored.transaction_id == r.transaction_id and stored.payload == r.payload
    assert stored.lease_owner is None and stored.attempts == 0
    assert len(store.find()) == 1


@pytest.mark.parametrize("final", ["delivered", "dead"])
def test_add_of_a_finished_id_returns_it(store: Store, final: str) -> None:
    r = rec()
    store.add(r, owner="w", lease=30)
    assert finish(store, r, "w", final, status=200 if final == "delivered" else 400)
    stored, created = store.add(rec(id=r.id), owner=None, lease=30)
    assert not created and stored.state == final


def test_add_collapses_onto_a_live_record_with_the_same_dedupe_key(store: Store) -> None:
    first = rec(txn="t1")
    store.add(first, owner=None, lease=30)
    second = rec(txn="t1")
    stored, created = store.add(second, owner="x", lease=30)
    assert not created and stored.id == first.id
    assert store.get(second.id) is None
    # delivered still holds the key
    claimed = store.claim("w", 1, 30)
    assert [c.id for c in claimed] == [first.id]
    assert finish(store, first, "w", "delivered", status=200)
    stored, created = store.add(rec(txn="t1"), owner=None, lease=30)
    assert not created and stored.id == first.id


def test_a_dead_record_frees_its_dedupe_key(store: Store) -> None:
    first = rec(txn="t1")
    make_dead(store, first)
    second = rec(txn="t1")
    stored, created = store.add(second, owner=None, lease=30)
    assert created and stored.id == second.id


def test_events_without_a_dedupe_key_repeat(store: Store) -> None:
    a, b = rec(txn="t1", dedupe=False), rec(txn="t1", dedupe=False)
    assert store.add(a, owner=None, lease=30)[1] and store.add(b, owner=None, lease=30)[1]
    assert {r.id for r in store.find(transaction_id="t1")} == {a.id, b.id}


def test_concurrent_adds_of_one_dedupe_key_keep_exactly_one(store_factory: StoreFactory) -> None:
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool]] = []

    def add(_: int) -> None:
        store = store_factory()
        barrier.wait()
        stored, created = store.add(rec(txn="same"), owner=None, lease=30)
        results.append((stored.id, created))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert sum(created for _, created in results) == 1
    assert len({rid for rid, _ in results}) == 1


# --- ids scoped to their campaign, with the event's fingerprint -----------------------------------


def test_one_client_id_in_two_campaigns_is_two_records(store: Store) -> None:
    a = rec(id=scoped_id("cmp_a", "same-client-id"), cid="cmp_a", txn="t1")
    b = rec(id=scoped_id("cmp_b", "same-client-id"), cid="cmp_b", txn="t1")
    assert store.add(a, owner=None, lease=30)[1]
    stored, created = store.add(b, owner=None, lease=30)
    assert created and stored.cid == "cmp_b"
    got_a, got_b = store.get(a.id), store.get(b.id)
    assert got_a is not None and got_b is not None
    assert (got_a.cid, got_b.cid) == ("cmp_a", "cmp_b")
    assert got_a.event_uuid == got_b.event_uuid == "same-client-id"


def test_the_fingerprint_is_kept_and_comes_back_with_the_existing_record(store: Store) -> None:
    r = rec(id=scoped_id("cmp_test", "fp-client-id"))
    r.fingerprint = "f" * 32
    store.add(r, owner=None, lease=30)
    got = store.get(r.id)
    assert got is not None and got.fingerprint == "f" * 32
    again = rec(id=r.id)
    again.fingerprint = "0" * 32
    stored, created = store.add(again, owner=None, lease=30)
    assert not created and stored.fingerprint == "f" * 32


def test_a_record_stored_before_ids_were_scoped_is_found_for_its_own_campaign_only(store: Store) -> None:
    legacy = rec(id="legacy-client-id", cid="cmp_a", dedupe=False)  # the bare event_uuid, as before
    store.add(legacy, owner=None, lease=30)
    stored, created = store.add(
        rec(id=scoped_id("cmp_a", "legacy-client-id"), cid="cmp_a", dedupe=False), owner=None, lease=30
    )
    assert not created and stored.id == "legacy-client-id" and stored.event_uuid == "legacy-client-id"
    stored, created = store.add(
        rec(id=scoped_id("cmp_b", "legacy-client-id"), cid="cmp_b", dedupe=False), owner=None, lease=30
    )
    assert created and stored.cid == "cmp_b"


def test_sqlite_file_of_an_older_relay_gets_the_new_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # the schema before fingerprints, with one pending event
        conn.executescript(OLD_SQLITE_SCHEMA)
        conn.execute(
            "INSERT INTO events (id, cid, event_id, transaction_id, payload, received_at, updated_at) "
            "VALUES ('old-client-id', 'cmp_a', 'view', 't1', '{}', 1.0, 1.0)"
        )
    conn.close()
    store = SQLiteStore(str(path))
    try:
        old = store.get("old-client-id")
        assert old is not None and old.fingerprint is None and old.state == "pending"
        stored, created = store.add(
            rec(id=scoped_id("cmp_a", "old-client-id"), cid="cmp_a", dedupe=False), owner=None, lease=30
        )
        assert not created and stored.id == "old-client-id"
        assert [r.id for r in store.claim("w", 10, 30)] == ["old-client-id"]
    finally:
        store.close()


OLD_SQLITE_SCHEMA = """
CREATE TABLE events (
    id TEXT PRIMARY KEY, cid TEXT NOT NULL, event_id TEXT NOT NULL, transaction_id TEXT NOT NULL,
    dedupe_key TEXT, payload TEXT NOT NULL, received_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL DEFAULT 0, lease_owner TEXT,
    uncertain INTEGER NOT NULL DEFAULT 0, last_status INTEGER, last_answer TEXT, last_error TEXT,
    updated_at REAL NOT NULL, delivered_at REAL, latency_ms REAL
);
"""


# --- claim, leases, finish, release ----------------------------------------------------------------


def test_claim_leases_due_records_up_to_the_limit(store: Store) -> None:
    ids = [store.add(rec(), owner=None, lease=30)[0].id for _ in range(5)]
    before = time.time()
    first = store.claim("w1", 3, 30)
    assert len(first) == 3
    for r in first:
        assert r.lease_owner == "w1" and r.attempts == 1 and r.state == "pending" and not r.uncertain
        assert before + 29 <= r.next_at <= time.time() + 31
        assert r.display_state() == "delivering"
    second = store.claim("w2", 3, 30)
    assert len(second) == 2
    assert sorted(r.id for r in first + second) == sorted(ids)
    assert store.claim("w3", 3, 30) == []
    assert store.claim("w3", 0, 30) == []


def test_claim_takes_the_earliest_due_first(store: Store) -> None:
    a, b = rec(), rec()
    store.add(a, owner="w", lease=30)
    store.add(b, owner="w", lease=30)
    now = time.time()
    assert finish(store, a, "w", "pending", next_at=now - 1)
    assert finish(store, b, "w", "pending", next_at=now - 5)
    assert [r.id for r in store.claim("x", 1, 30)] == [b.id]


def test_a_retry_is_not_claimed_before_its_time(store: Store) -> None:
    r = rec()
    store.add(r, owner="w", lease=30)
    assert finish(
        store, r, "w", "pending", next_at=time.time() + 0.6, status=500, error="500 boom", uncertain=True
    )
    got = store.get(r.id)
    assert got is not None and got.lease_owner is None and got.display_state() == "retrying"
    assert got.uncertain and got.last_error == "500 boom" and got.last_status == 500
    assert store.claim("w", 10, 30) == []
    [again] = wait_for(lambda: store.claim("w", 10, 30), timeout=5, message="the retry to fall due")
    assert again.id == r.id and again.attempts == 2
    assert again.uncertain  # uncertainty is sticky until the record is finished for good


def test_an_expired_lease_is_reclaimed_and_marked_uncertain(store: Store) -> None:
    r = rec()
    store.add(r, owner=None, lease=30)
    [mine] = store.claim("dies", 1, 0.3)
    assert not mine.uncertain
    assert store.claim("other", 1, 30) == []  # still leased
    [taken] = wait_for(lambda: store.claim("other", 1, 30), timeout=5, message="the lease to expire")
    assert taken.id == r.id and taken.lease_owner == "other" and taken.attempts == 2
    assert taken.uncertain  # the dead worker's attempt may have reached Pingtree
    # The first owner comes back to life too late: its outcome must not overwrite the new lease.
    assert not finish(store, r, "dies", "delivered", status=200)
    assert finish(store, r, "other", "delivered", status=400, answer={"message": "Duplicate"})
    got = store.get(r.id)
    assert got is not None and got.state == "delivered" and got.last_status == 400


def test_a_late_outcome_cannot_drop_the_same_owners_next_lease(store: Store) -> None:
    """One process, one owner id: after its lease ran out (its outcome could not be stored in time),
    it claims the record again and sends it again. The first attempt's outcome, arriving late, must
    not drop that second lease while its send is in flight (a third send would start beside it)."""
    r = rec()
    store.add(r, owner=None, lease=30)
    [first] = store.claim("engine", 1, 0.3)
    [second] = wait_for(lambda: store.claim("engine", 1, 30), timeout=5, message="the lease to expire")
    assert (first.attempts, second.attempts) == (1, 2)
    late = Outcome(r.id, "engine", "pending", time.time(), status=503, error="503", attempts=first.attempts)
    assert store.finish_many([late]) == [False]
    got = store.get(r.id)
    assert got is not None and got.lease_owner == "engine" and got.last_status is None  # still leased
    assert store.claim("engine", 1, 30) == []  # and not due: nobody sends it a third time
    now = Outcome(r.id, "engine", "delivered", time.time(), status=200, attempts=second.attempts)
    assert store.finish_many([now]) == [True]
    got = store.get(r.id)
    assert got is not None and got.state == "delivered" and got.last_status == 200


def test_an_expired_inline_lease_is_uncertain_too(store: Store) -> None:
    r = rec()
    store.add(r, owner="inline", lease=0.3)  # the process died during its inline attempt
    [taken] = wait_for(lambda: store.claim("w", 1, 30), timeout=5, message="the inline lease to expire")
    assert taken.uncertain and taken.attempts == 2


def test_finish_is_only_for_the_lease_owner(store: Store) -> None:
    r = rec()
    store.add(r, owner=None, lease=30)
    assert not finish(store, r, "w", "delivered")  # not leased at all
    store.claim("w", 1, 30)
    assert not finish(store, r, "intruder", "delivered", status=200)
    got = store.get(r.id)
    assert got is not None and got.state == "pending" and got.lease_owner == "w"
    assert finish(
        store, r, "w", "delivered", status=200, answer={"data": {"conversion_id": "c1"}}, latency_ms=12.5
    )
    assert not finish(store, r, "w", "dead", status=400)  # finished once only
    assert not finish(store, rec(), "w", "delivered")  # unknown id


def test_finish_records_the_outcome(store: Store) -> None:
    a, b = rec(), rec()
    for r in (a, b):
        store.add(r, owner="w", lease=30)
    before = time.time()
    assert finish(
        store, a, "w", "delivered", status=200, answer={"data": {"conversion_id": "c1"}}, latency_ms=12.5
    )
    assert finish(
        store,
        b,
        "w",
        "dead",
        status=400,
        answer={"message": "Invalid event_id"},
        error="400 Invalid event_id",
        uncertain=True,
    )
    got_a, got_b = store.get(a.id), store.get(b.id)
    assert got_a is not None and got_b is not None
    assert (got_a.state, got_a.lease_owner, got_a.last_status, got_a.latency_ms) == (
        "delivered",
        None,
        200,
        12.5,
    )
    assert got_a.last_answer == {"data": {"conversion_id": "c1"}} and got_a.last_error is None
    assert got_a.delivered_at is not None and before - 1 <= got_a.delivered_at <= time.time() + 1
    assert (got_b.state, got_b.last_status, got_b.last_error, got_b.uncertain) == (
        "dead",
        400,
        "400 Invalid event_id",
        True,
    )
    assert got_b.delivered_at is None and got_b.display_state() == "dead"
    assert store.claim("w", 10, 30) == []


@pytest.mark.parametrize("state", ["retry", "queued", ""])
def test_finish_refuses_a_state_that_does_not_exist(store: Store, state: str) -> None:
    r = rec()
    store.add(r, owner="w", lease=30)
    with pytest.raises(ValueError):
        finish(store, r, "w", state)


def test_finish_many_settles_a_batch_in_order_and_checks_each_owner(store: Store) -> None:
    records = [rec() for _ in range(5)]
    for r in records:
        store.add(r, owner=None, lease=30)
    assert len(store.claim("w", 5, 30)) == 5
    a, b, c, d, e = records
    later = time.time() + 3600
    flags = store.finish_many(
        [
            Outcome(
                a.id, "w", "delivered", time.time(), 200, {"data": {"conversion_id": "c1"}}, None, False, 5.0
            ),
            Outcome(b.id, "intruder", "delivered", time.time(), 200),  # not the lease owner
            Outcome(c.id, "w", "dead", time.time(), 400, {"message": "no"}, "400 no", True),
            Outcome(d.id, "w", "pending", later, 503, None, "503", True),  # a retry, due in an hour
            Outcome("no-such-id", "w", "delivered", time.time()),
            Outcome(e.id, "w", "pending", time.time() - 1, None, None, "connect: ConnectError", False),
        ]
    )
    assert flags == [True, False, True, True, False, True]
    got = {r.id: store.get(r.id) for r in records}
    assert (got[a.id].state, got[a.id].last_answer, got[a.id].latency_ms) == (
        "delivered",
        {"data": {"conversion_id": "c1"}},
        5.0,
    )
    assert got[a.id].delivered_at is not None
    assert (got[b.id].state, got[b.id].lease_owner) == ("pending", "w")
    assert (got[c.id].state, got[c.id].last_error, got[c.id].uncertain) == ("dead", "400 no", True)
    assert (got[d.id].state, got[d.id].lease_owner, got[d.id].uncertain) == ("pending", None, True)
    assert got[d.id].next_at == pytest.approx(later)
    assert store.stats().counts == {"pending": 3, "delivered": 1, "dead": 1}
    assert [r.id for r in store.claim("w2", 10, 30)] == [e.id]  # due now; d waits for its hour
    assert store.finish_many([]) == []
    with pytest.raises(ValueError):
        store.finish_many([Outcome(e.id, "w2", "retry", time.time())])


def test_finish_many_is_one_transaction_or_one_round_trip(store: Store) -> None:
    records = [rec() for _ in range(50)]
    for r in records:
        store.add(r, owner="w", lease=30)
    outcomes = [Outcome(r.id, "w", "delivered", time.time(), 200) for r in records]
    with count_store_writes(store) as writes:
        assert store.finish_many(outcomes) == [True] * 50
    assert writes() == 1, writes()
    assert store.stats().counts["delivered"] == 50


def test_backlog_counts_due_unleased_records_up_to_a_limit(store: Store) -> None:
    assert store.backlog(10) == 0
    records = [rec() for _ in range(6)]
    for r in records[:5]:
        store.add(r, owner=None, lease=30)
    store.add(records[5], owner="inline", lease=30)  # leased: being delivered, not waiting
    assert store.backlog(100) == 5 and store.backlog(3) == 3
    [taken] = store.claim("w", 1, 30)
    assert store.backlog(100) == 4
    finish(store, taken, "w", "pending", next_at=time.time() + 3600)  # a retry, not due yet
    assert store.backlog(100) == 4


def test_release_gives_leases_back_unattempted(store: Store) -> None:
    a, b = rec(), rec()
    store.add(a, owner=None, lease=30)
    store.add(b, owner=None, lease=30)
    claimed = store.claim("w", 2, 30)
    assert len(claimed) == 2
    assert store.release([a.id, b.id], "someone-else") == 0
    assert store.release([a.id, b.id, "no-such-id"], "w") == 2
    got = store.get(a.id)
    assert got is not None and (got.lease_owner, got.attempts, got.state) == (None, 0, "pending")
    again = store.claim("w2", 5, 30)  # claimable at once, and not uncertain: it was never sent
    assert {r.id for r in again} == {a.id, b.id}
    assert all(not r.uncertain and r.attempts == 1 for r in again)
    assert store.release([], "w2") == 0


def test_claims_from_many_threads_never_overlap(store_factory: StoreFactory) -> None:
    seed = store_factory()
    ids = {seed.add(rec(), owner=None, lease=60)[0].id for _ in range(500)}
    claims: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        store = store_factory()  # its own handle, as another process would have
        barrier.wait()
        while True:
            batch = store.claim(f"w{n}", 7, 60)
            if not batch:
                return
            with lock:
                claims.extend(r.id for r in batch)
            for r in batch:
                assert finish(store, r, f"w{n}", "delivered", status=200)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    duplicates = [i for i, n in Counter(claims).items() if n > 1]
    assert not duplicates, f"claimed more than once: {duplicates[:5]}"
    assert set(claims) == ids
    assert seed.stats().counts == {"pending": 0, "delivered": 500, "dead": 0}


def _claim_in_child(store: Store, owner: str, out: Any) -> None:
    """Runs in a forked child: the store was opened by the parent and must re-connect by itself."""
    ids: list[str] = []
    while batch := store.claim(owner, 5, 60):
        ids.extend(r.id for r in batch)
    out.put(ids)


def test_claims_from_forked_processes_never_overlap(store: Store) -> None:
    ids = {store.add(rec(), owner=None, lease=60)[0].id for _ in range(200)}
    assert store.ping()  # the parent's connection exists before the fork, as in gunicorn
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(store, f"p{n}", out)) for n in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    claimed = [i for batch in results for i in batch]
    assert len(claimed) == len(set(claimed)) == 200 and set(claimed) == ids
    assert store.ping()  # and the parent's handle still works after its children used theirs


# --- reading and operating -----------------------------------------------------------------------


def test_list_is_newest_first_with_filters(store: Store) -> None:
    base = time.time() - 100
    records = [
        rec(cid="cmp_a", event_id="quote_viewed", txn="t1", received_at=base + 1),
        rec(cid="cmp_a", event_id="form_submitted", txn="t1", received_at=base + 2),
        rec(cid="cmp_b", event_id="quote_viewed", txn="t2", received_at=base + 3),
        rec(cid="cmp_a", event_id="quote_viewed", txn="t3", received_at=base + 4),
    ]
    for r in records:
        store.add(r, owner=None, lease=30)
    make_dead(store, rec(cid="cmp_b", event_id="signup", txn="t4", received_at=base + 5))
    ids = [r.id for r in records]
    listed = store.find()
    assert [r.id for r in listed[1:]] == ids[::-1] and listed[0].state == "dead"
    assert [r.id for r in store.find(limit=2)] == [listed[0].id, ids[3]]
    assert [r.id for r in store.find(cid="cmp_a")] == [ids[3], ids[1], ids[0]]
    assert [r.id for r in store.find(event_id="quote_viewed")] == [ids[3], ids[2], ids[0]]
    assert [r.id for r in store.find(transaction_id="t1")] == [ids[1], ids[0]]
    assert [r.id for r in store.find(cid="cmp_a", event_id="quote_viewed", limit=1)] == [ids[3]]
    assert [r.id for r in store.find(state="dead")] == [listed[0].id]
    assert [r.id for r in store.find(state="pending", cid="cmp_b")] == [ids[2]]
    assert store.find(state="delivered") == [] and store.find(cid="nobody") == []


def test_list_pages_through_a_long_index(store: Store) -> None:
    base = time.time() - 1000
    for i in range(150):
        store.add(rec(cid="cmp_a" if i % 10 else "cmp_b", received_at=base + i), owner=None, lease=30)
    rare = store.find(cid="cmp_b", event_id="form_submitted", limit=100)
    assert len(rare) == 15
    assert [r.received_at for r in rare] == sorted((r.received_at for r in rare), reverse=True)
    assert len(store.find(limit=120)) == 120


def test_stats_counts_states_and_the_oldest_pending_age(store: Store) -> None:
    assert store.stats().counts == {"pending": 0, "delivered": 0, "dead": 0}
    assert store.stats().oldest_pending_age == 0.0
    store.add(rec(received_at=time.time() - 120), owner=None, lease=30)
    store.add(rec(received_at=time.time() - 10), owner="w", lease=30)
    delivered = rec(received_at=time.time() - 500)  # old, but not pending: does not count for age
    store.add(delivered, owner="w", lease=30)
    assert finish(store, delivered, "w", "delivered", status=200)
    make_dead(store, rec())
    stats = store.stats()
    assert stats.counts == {"pending": 2, "delivered": 1, "dead": 1}
    assert 119 <= stats.oldest_pending_age <= 125
    assert stats.to_dict()["counts"] == stats.counts


def test_requeue_by_ids_by_campaign_and_all(store: Store) -> None:
    a, b, c = rec(cid="cmp_a"), rec(cid="cmp_b"), rec(cid="cmp_b")
    for r in (a, b, c):
        make_dead(store, r)
    live = rec()
    store.add(live, owner=None, lease=30)
    before = time.time()
    assert store.requeue(ids=[a.id, live.id, "no-such-id"]) == 1  # only dead letters move
    got = store.get(a.id)
    assert got is not None and got.state == "pending" and got.lease_owner is None
    assert got.next_at <= time.time() and got.last_error  # the reason stays for the operator
    # When it was requeued (max_age_hours counts from then), and its receipt as it was.
    assert got.requeued_at is not None and before <= got.requeued_at <= time.time()
    assert got.received_at == a.received_at and store.get(live.id).requeued_at is None
    assert store.requeue(cid="cmp_a") == 0
    assert store.requeue(cid="cmp_b") == 2
    assert store.stats().counts == {"pending": 4, "delivered": 0, "dead": 0}
    assert {r.id for r in store.claim("w", 10, 30)} == {a.id, b.id, c.id, live.id}
    for r in (a, b, c):
        assert finish(store, r, "w", "dead", status=400)
    assert store.requeue(everything=True) == 3
    assert store.requeue(everything=True) == 0
    assert store.requeue() == 0


def test_requeue_skips_a_dead_letter_whose_key_a_live_event_now_holds(store: Store) -> None:
    dead = rec(txn="t1")
    make_dead(store, dead)
    newer = rec(txn="t1")
    assert store.add(newer, owner=None, lease=30)[1]
    other = rec(txn="t2")
    make_dead(store, other)
    assert store.requeue(everything=True) == 1  # t2 only: re-queueing t1 would send it twice
    got = store.get(dead.id)
    assert got is not None and got.state == "dead"
    # once the key is free again, the dead letter can go
    [claimed] = [r for r in store.claim("w", 10, 30) if r.id == newer.id]
    assert finish(store, claimed, "w", "dead", status=400)
    assert store.requeue(ids=[dead.id]) == 1
    stored, created = store.add(rec(txn="t1"), owner=None, lease=30)
    assert not created and stored.id == dead.id  # and it holds the key again


def test_purge_deletes_finished_records_by_age(store: Store) -> None:
    delivered, dead, pending = rec(txn="t1"), rec(txn="t2"), rec(txn="t3")
    store.add(delivered, owner="w", lease=30)
    assert finish(store, delivered, "w", "delivered", status=200)
    make_dead(store, dead)
    store.add(pending, owner=None, lease=30)
    with pytest.raises(ValueError):
        store.purge(state="pending")
    assert store.purge(state="delivered", older_than=3600) == 0
    assert store.purge(state="delivered") == 1
    assert store.get(delivered.id) is None and store.get(dead.id) is not None
    assert store.purge(state="dead") == 1
    assert [r.id for r in store.find()] == [pending.id]
    assert store.stats().counts == {"pending": 1, "delivered": 0, "dead": 0}
    # a purged delivered event no longer holds its key: the relay forgets it entirely
    assert store.add(rec(txn="t1"), owner=None, lease=30)[1]


def test_timeline_buckets_received_events_by_minute_and_outcome(store: Store) -> None:
    minute = (int(time.time()) // 60 - 10) * 60
    old = rec(received_at=minute - 600)
    store.add(old, owner=None, lease=30)
    queued = rec(received_at=minute + 1)
    store.add(queued, owner=None, lease=30)
    retrying, delivered, dead = (
        rec(received_at=minute + 2),
        rec(received_at=minute + 61),
        rec(received_at=minute + 62),
    )
    for r in (retrying, delivered, dead):
        store.add(r, owner="w", lease=30)
    assert finish(store, retrying, "w", "pending", next_at=time.time() + 60, status=500)
    assert finish(store, delivered, "w", "delivered", status=200)
    assert finish(store, dead, "w", "dead", status=400)
    assert sorted(store.timeline(minute)) == [
        (minute, "queued", 1),
        (minute, "retrying", 1),
        (minute + 60, "dead", 1),
        (minute + 60, "delivered", 1),
    ]
    assert store.timeline(time.time() + 60) == []


def test_ping_and_close_then_reopen(store: Store) -> None:
    assert store.ping()
    r = rec()
    store.add(r, owner=None, lease=30)
    store.close()
    assert store.ping() and store.get(r.id) is not None  # a closed handle reconnects on use


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    sqlite = open_store(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    assert isinstance(sqlite, SQLiteStore)
    sqlite.close()
    with pytest.raises(ValueError):
        open_store("postgres://nope")


@pytest.mark.redis
def test_redis_prefixes_keep_queues_apart(redis_url: str) -> None:
    a, b = RedisStore(redis_url, prefix="ptr-a:"), RedisStore(redis_url, prefix="ptr-b:")
    assert isinstance(open_store(redis_url), RedisStore)
    r = rec()
    a.add(r, owner=None, lease=30)
    assert b.get(r.id) is None and b.claim("w", 10, 30) == [] and b.stats().counts["pending"] == 0
    assert [x.id for x in a.claim("w", 10, 30)] == [r.id]


@pytest.mark.redis
def test_redis_store_survives_an_unreachable_server_as_ping_false() -> None:
    from tests.redis_fixture import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    assert store.ping() is False
