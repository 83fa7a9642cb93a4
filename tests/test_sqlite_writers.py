"""How SQLiteStore's writers queue: group commit in a process, an flock across processes."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from server.outbox import Record
from server.outbox.sqlite import SQLiteStore
from tests.conftest import wait_for


def _record(uuid: str, dedupe_key: str | None = None) -> Record:
    return Record(
        id=f"cmp:{uuid}",
        cid="cmp",
        event_id="quote_viewed",
        transaction_id=f"t-{uuid}",
        payload={"event_uuid": uuid},
        received_at=time.time(),
        dedupe_key=dedupe_key,
    )


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(str(tmp_path / "outbox.sqlite3"))
    yield s
    s.close()


def _add_all(store: SQLiteStore, records: list[Record]) -> tuple[list[threading.Thread], list[object]]:
    results: list[object] = [None] * len(records)

    def add(i: int) -> None:
        try:
            results[i] = store.add(records[i], owner=None, lease=30)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(records))]
    for t in threads:
        t.start()
    return threads, results


def test_adds_queued_meanwhile_are_committed_in_one_transaction(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real = store._insert_all
    monkeypatch.setattr(
        store, "_insert_all", lambda conn, rows: batches.append(len(rows)) or real(conn, rows)
    )
    # Two events share an id (a client's retry arriving twice) and one a dedupe key: in one batch,
    # the first of each is stored and the second is answered with it, as if they came one by one.
    records = [_record(f"u{i}") for i in range(6)] + [_record("u0"), _record("d1", "k"), _record("d2", "k")]
    with store._wlock:  # hold the writers back until all nine are queued
        threads, results = _add_all(store, records)
        wait_for(lambda: len(store._queued) == len(records), timeout=60, message="nine queued adds")
    for t in threads:
        t.join(60)
    assert batches == [9]
    stored = [r for r in results if isinstance(r, tuple) and r[1]]
    replays = [r for r in results if isinstance(r, tuple) and not r[1]]
    assert len(stored) == 7 and len(replays) == 2, results
    assert {r[0].id for r in replays} == {"cmp:u0", "cmp:d1"}
    assert store.stats().counts["pending"] == 7


def test_one_adds_failure_is_its_own_answer_not_its_neighbours(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store._insert_all
    poisoned = "cmp:bad"

    def insert_all(conn: object, rows: list[tuple[object, ...]]) -> list[bool]:
        if any(row[0] == poisoned for row in rows):
            import sqlite3

            raise sqlite3.OperationalError("database or disk is full")
        return real(conn, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_insert_all", insert_all)
    records = [_record("a"), _record("bad"), _record("c")]
    with store._wlock:
        threads, results = _add_all(store, records)
        wait_for(lambda: len(store._queued) == 3, timeout=60, message="three queued adds")
    for t in threads:
        t.join(60)
    assert isinstance(results[1], Exception) and "full" in str(results[1])
    assert all(isinstance(results[i], tuple) and results[i][1] for i in (0, 2)), results
    assert store.get("cmp:a") is not None and store.get("cmp:bad") is None


def test_writers_of_other_processes_wait_on_the_box_wide_lock(store: SQLiteStore) -> None:
    lock_path = store.path + "-writer.lock"
    store.add(_record("first"), owner=None, lease=30)  # creates the lock file
    assert os.path.exists(lock_path)
    held = os.open(lock_path, os.O_RDWR)  # another process's writer, as far as the store can tell
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        threads, results = _add_all(store, [_record("second")])
        threads[0].join(0.3)
        assert threads[0].is_alive() and results[0] is None  # waiting for the lock, not writing
    finally:
        fcntl.flock(held, fcntl.LOCK_UN)
        os.close(held)
    threads[0].join(60)
    assert isinstance(results[0], tuple) and results[0][1]


def test_a_forked_child_takes_its_own_box_lock(store: SQLiteStore) -> None:
    store.add(_record("parent"), owner=None, lease=30)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a gunicorn worker forked after the master opened the store
        os.close(read)
        try:
            store.add(_record("child"), owner=None, lease=30)
            os.write(write, b"ok" if store._lock_fd not in (None, -1) else b"no fd")
        except Exception as exc:  # noqa: BLE001
            os.write(write, repr(exc).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 200) == b"ok"
    os.close(read)
    assert store.get("cmp:child") is not None
