"""How SQLiteStore's writers queue in one process: group commit."""

from __future__ import annotations

import os
import struct
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
        wait_for(lambda: len(store._adds) == len(records), timeout=60, message="nine queued adds")
    for t in threads:
        t.join(60)
    assert batches == [9]
    stored = [r for r in results if isinstance(r, tuple) and r[1]]
    replays = [r for r in results if isinstance(r, tuple) and not r[1]]
    assert len(stored) == 7 and len(replays) == 2, results
    # Which of a pair is first depends on the threads' order; each replay answers with the stored one.
    replayed_ids = sorted(r[0].id for r in replays)
    assert replayed_ids[1] == "cmp:u0" and replayed_ids[0] in ("cmp:d1", "cmp:d2"), replayed_ids
    assert store.get(replayed_ids[0]) is not None
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
        wait_for(lambda: len(store._adds) == 3, timeout=60, message="three queued adds")
    for t in threads:
        t.join(60)
    assert isinstance(results[1], Exception) and "full" in str(results[1])
    assert all(isinstance(results[i], tuple) and results[i][1] for i in (0, 2)), results
    assert store.get("cmp:a") is not None and store.get("cmp:bad") is None


def test_a_forked_child_queues_its_own_adds(store: SQLiteStore) -> None:
    """Forked while another thread of the parent held the write lock with an add queued (gunicorn
    forks workers from a master that may have written): the child neither waits for that lock
    forever nor commits the parent's add."""
    store.add(_record("parent"), owner=None, lease=30)
    read, write = os.pipe()
    store._wlock.acquire()
    threads, results = _add_all(store, [_record("parents-queued")])
    wait_for(lambda: len(store._adds) == 1, timeout=60, message="the parent's queued add")
    child = os.fork()
    if child == 0:  # a gunicorn worker forked after the master opened the store
        os.close(read)
        try:
            store.add(_record("child"), owner=None, lease=30)
            os.write(write, b"ok")
        except Exception as exc:  # noqa: BLE001
            os.write(write, repr(exc).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 200) == b"ok"
    os.close(read)
    assert store.get("cmp:child") is not None and store.get("cmp:parents-queued") is None
    store._wlock.release()
    threads[0].join(60)
    assert isinstance(results[0], tuple) and results[0][1]


def _wal_frames(store: SQLiteStore) -> tuple[int, int]:
    """(frames in the WAL, frames of them copied back into the database file), read from the
    WAL index (its header's mxFrame, its checkpoint info's nBackfill: sqlite.org/walformat.html)
    without running a checkpoint, which any PRAGMA asking for them would."""
    shm = Path(store.path + "-shm").read_bytes()
    return struct.unpack_from("=I", shm, 16)[0], struct.unpack_from("=I", shm, 96)[0]


def test_commits_leave_the_checkpoint_to_the_engines_upkeep(store: SQLiteStore) -> None:
    # Far past SQLite's default automatic checkpoint (1,000 pages), each add has only appended to
    # the WAL: its copy and fsyncs, in one request in about 150, stalled every request behind it...
    for i in range(600):
        store.add(_record(f"u{i:05d}-ckpt"), owner=None, lease=30)
    frames, copied = _wal_frames(store)
    assert frames > 1000 and copied == 0
    # ...and the engine's maintain() copies every page back (RESTART, past RESTART_FRAMES, leaves the
    # counts to the next writer: copied equals frames either way).
    store.maintain()
    frames, copied = _wal_frames(store)
    assert copied == frames
