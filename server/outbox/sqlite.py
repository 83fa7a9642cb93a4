"""The SQLite outbox: one file in WAL mode, shared by every worker process on one box.

Why these settings: WAL lets readers and the one writer proceed together; ``synchronous=NORMAL``
makes a commit durable against a process crash (SIGKILL, OOM) without an fsync per event, which is
what keeps the accept path above 1,000 events/s; only an OS crash or power cut may lose the last
moments of commits. ``BEGIN IMMEDIATE`` takes the write lock up front so that two processes
claiming at once serialise instead of deadlocking on a lock upgrade; ``busy_timeout`` makes them
wait for each other rather than fail.

Checkpoints (copying the WAL's pages back into the database file, with an fsync of each) are the
delivery engine's, not the accept path's: :meth:`SQLiteStore.maintain`, which the engine calls every
``MAINTAIN_SECONDS`` on a store thread of its own, runs a ``PASSIVE`` one (it waits for nobody, and
writers go on meanwhile). SQLite's own automatic checkpoint runs inside whichever commit crosses
1,000 WAL pages, so one request in about 150 paid for the copy and its fsyncs while every request
behind it on that worker waited: measured under ``serve`` with the upstream down, the workers spent
584 us of CPU per accepted event with it and 498 us with it pushed back (the A/B in
docs/benchmarks.md). It is kept, much higher (``AUTOCHECKPOINT_FRAMES``), as the safety net for a
box whose engine is not running (or is starved of CPU: it runs at the delivery processes' lower
priority): commits then checkpoint as before, from 10,000 pages on, until the engine is back.

A full disk: a write fails with SQLITE_FULL, and the WAL that grew meanwhile keeps the space even
once the disk has room again (SQLite reuses a WAL file but never shrinks it by itself). So after
such a failure, and once a minute anyway where an engine runs (:meth:`SQLiteStore.maintain`), the
store runs ``wal_checkpoint(TRUNCATE)``, and readiness is a real write
(:meth:`SQLiteStore.check_writable`), not a ``SELECT 1``.
``PINGTREE_RELAY_SQLITE_MAX_PAGE_COUNT`` caps the file's pages on every connection: how the tests
fill a "disk" without a mount.

Writers of one process queue on a thread lock before SQLite sees them (SQLite's busy handler
would make a thread that finds the write lock taken sleep 1, 2, 5, 10... ms), and events arriving
together are committed together (group commit, :meth:`SQLiteStore.add`): the thread that gets the
lock writes every event queued meanwhile in one transaction, and each caller is answered only once
its event is committed, as before; requests on a worker's loop are committed together at the
loop's turn (server/group_commit.py, whose :class:`CommitQueue` holds the queue and the lock).
Other processes' writers (the other workers, the delivery process) are waited out by polling
SQLite's lock with short pauses (:func:`_busy_retry`). An
``flock`` queue across processes was tried: the kernel does not hand it over in order, and a worker
whose next writer was already waiting kept taking it back, starving the delivery process's claims
(delivered 250-440 ev/s against 400-550 with polling, same load).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ..group_commit import CommitQueue, Write
from . import Outcome, Persistence, Record, State, Stats, Store, payload_json
from .schema import upgrade_sqlite

T = TypeVar("T")
log = logging.getLogger("pingtree_relay.outbox")

MAX_PAGE_COUNT_ENV = "PINGTREE_RELAY_SQLITE_MAX_PAGE_COUNT"
CHECKPOINT_INTERVAL = 60.0  # seconds between two WAL truncations while writes succeed
# SQLite's automatic checkpoint, inside a commit: only past this many WAL pages (its default is
# 1,000). The engine's maintain() checkpoints long before, every MAINTAIN_SECONDS (module docstring).
AUTOCHECKPOINT_FRAMES = 10_000
RESTART_FRAMES = 4_000  # maintain() starts the WAL over past this many frames (16 MB)
RESTART_WAIT_MS = 10  # how long that RESTART may wait for the writer and the WAL's readers
WARN_EVERY_SECONDS = 60.0  # maintain()'s warnings, at most this often
# The readiness write: larger than a typical stored event (~1 KB), so "ready" means there is
# room for events, not merely for one tiny row in a page that already exists.
PROBE_BYTES = 8192

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    cid TEXT NOT NULL,
    event_id TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    dedupe_key TEXT,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    uncertain INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_answer TEXT,
    last_error TEXT,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    latency_ms REAL
);
-- One live event per (cid, transaction_id, event_id) for events that may not repeat; dead ones
-- don't count, so a lead can fire again after a dead letter.
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events(dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state != 'dead';
CREATE INDEX IF NOT EXISTS events_due ON events(state, next_at);
CREATE INDEX IF NOT EXISTS events_received ON events(received_at);
CREATE INDEX IF NOT EXISTS events_txn ON events(transaction_id);
-- Readiness probes write here (one row kept): see SQLiteStore.check_writable.
CREATE TABLE IF NOT EXISTS write_probe (at REAL NOT NULL, filler BLOB NOT NULL);
"""

# Schema migrations, in order: entry N brings a store from version N to N+1 (schema.py applies them
# at start). Never edit an entry once released; append one instead.
_MIGRATIONS: tuple[str, ...] = (
    _SCHEMA,
    # 2: each record keeps a fingerprint of its validated event, so a reused event_uuid with another
    # body is refused instead of replayed (rows stored before have none and replay as before).
    "ALTER TABLE events ADD COLUMN fingerprint TEXT;",
    # 3: a requeued dead letter keeps when it was requeued, so that max_age_hours gives it a new
    # window from then (it counted from receipt, and an old one died at its first retryable failure).
    "ALTER TABLE events ADD COLUMN requeued_at REAL;",
)

_COLUMNS = (
    "id",
    "cid",
    "event_id",
    "transaction_id",
    "dedupe_key",
    "fingerprint",
    "payload",
    "received_at",
    "state",
    "attempts",
    "next_at",
    "lease_owner",
    "uncertain",
    "last_status",
    "last_answer",
    "last_error",
    "updated_at",
    "delivered_at",
    "latency_ms",
    "requeued_at",
)


def _row_to_record(row: sqlite3.Row) -> Record:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["payload"] = json.loads(data["payload"])
    data["last_answer"] = json.loads(data["last_answer"]) if data["last_answer"] else None
    data["uncertain"] = bool(data["uncertain"])
    return Record(**data)


_FINISH_SQL = (
    "UPDATE events SET state = ?, next_at = ?, lease_owner = NULL, last_status = ?, last_answer = ?, "
    "last_error = ?, uncertain = (uncertain OR ?), updated_at = ?, latency_ms = ?, "
    "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END "
    "WHERE id = ? AND lease_owner = ? AND state = 'pending' AND (? IS NULL OR attempts = ?)"
)

BUSY_WAIT_SECONDS = 30.0


LockWaitObserver = Callable[[str, float], None]


def _busy_retry(operation: Callable[[], T], waited: LockWaitObserver | None = None, kind: str = "other") -> T:
    """Run ``operation``, waiting out another process's write lock for up to 30 s.

    In place of SQLite's own busy handler, which sleeps 1, 2, 5, 10, 15... ms between tries: a
    write holds the lock for ~50 us, so those sleeps (not the writes) set the pace when two
    workers share a file. Here the waits start at 0.1 ms and double up to 1 ms: with two workers
    and two delivery processes writing, a 5 ms cap left a worker's threads queued behind one
    sleeping lock holder (10 of 10 threads waiting in a dump at 1,000 events/s); 1 ms delivered
    726 and 753 events/s against 707 and 692 in one A/B at a 300 ms upstream.

    An operation that had to wait reports it once, when it is over (done or given up):
    ``waited(kind, seconds)`` (the store's :attr:`SQLiteStore.lock_wait_observer`; the metrics'
    ``pingtree_relay_sqlite_lock_wait*``). One that did not wait costs nothing more.
    """
    try:
        return operation()
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            raise
    started = time.monotonic()
    deadline = started + BUSY_WAIT_SECONDS
    pause = 0.0001
    try:
        while True:
            time.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, 0.001)
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
    finally:
        if waited is not None:
            try:
                waited(kind, time.monotonic() - started)
            except Exception:  # observability must never cost a write
                log.exception("lock wait observer failed")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (the only error worth trying again)."""
    message = str(exc)
    return "locked" in message or "busy" in message


# What a new record has not got yet, written as NULL in the INSERT rather than bound as None: the
# sqlite3 module looks an adapter up for every None it binds (two failed attribute lookups, each
# an AttributeError built and dropped: about 3,000 instructions a None, measured by callgrind).
_EMPTY_AT_INSERT = frozenset({"last_status", "last_answer", "last_error", "delivered_at", "latency_ms"})
_INSERT_SQL = (
    # The NOT EXISTS: a record stored before ids were scoped has the bare event_uuid as id; for
    # its own campaign it is the same event. (The WHERE also lets SQLite parse the ON CONFLICT.)
    f"INSERT INTO events ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join('NULL' if c in _EMPTY_AT_INSERT else '?' for c in _COLUMNS)} "
    "WHERE NOT EXISTS (SELECT 1 FROM events WHERE id = ? AND cid = ?) ON CONFLICT DO NOTHING"
)


def _disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL, or an I/O error (what a full disk gives when the WAL cannot grow)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
    return isinstance(exc, sqlite3.OperationalError) and ("full" in str(exc) or "disk I/O" in str(exc))


class SQLiteStore(Store):
    """:class:`server.outbox.Store` on one SQLite file; a connection per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        # Writers of one process queue here, not in SQLite: SQLite's busy handler makes a thread that
        # finds the write lock taken sleep 1, 2, 5, 10... ms, and with a dozen request and delivery
        # threads per worker those sleeps, not the ~50 us INSERT, set the accept rate (4 ms per event
        # measured without this lock, under load). Only the other processes' writers remain to wait on.
        # The lock is the group commit queue's (_wlock), which a forked child gets afresh.
        self._adds = CommitQueue(self._insert_batch)
        # Told of every write that waited for another process's lock (server/metrics.py sets it).
        self.lock_wait_observer: LockWaitObserver | None = None
        self._checkpointed_at = time.monotonic()
        self._warned_at = -WARN_EVERY_SECONDS  # when maintain() last warned
        conn = self._conn()
        _busy_retry(lambda: upgrade_sqlite(conn, _MIGRATIONS, f"the outbox {path}"))

    @property
    def _wlock(self) -> threading.Lock:
        """This process's write lock: every write of the file takes it, the group commit's included."""
        return self._adds.lock

    def _conn(self) -> sqlite3.Connection:
        # A connection must not cross a fork: gunicorn workers each open their own.
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            self._local.pid = os.getpid()
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            # Under connect()'s 30 s busy timeout; retried as well, because switching a new file to
            # WAL while another process opens it can fail at once with "locked" (workers and the
            # delivery process all open the file at start-up).
            _busy_retry(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_FRAMES}")
            conn.execute("PRAGMA busy_timeout=0")  # from here on, _busy_retry waits instead
            max_pages = os.environ.get(MAX_PAGE_COUNT_ENV)
            if max_pages:
                conn.execute(f"PRAGMA max_page_count={int(max_pages)}")
            self._local.conn = conn
        return conn

    def _drop_conn(self) -> None:
        """Forget this thread's connection (closing it ends whatever transaction it still holds)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _rollback(self, conn: sqlite3.Connection) -> None:
        """End a failed transaction without hiding why it failed.

        SQLite rolls a transaction back by itself on some errors (SQLITE_FULL at COMMIT among
        them), and a ROLLBACK then raises "cannot rollback - no transaction is active" in place
        of the real error. If ROLLBACK itself fails, the connection is closed: a transaction left
        open would hold the write lock and stall every other process's writes.
        """
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.warning("ROLLBACK failed; closing this thread's connection", exc_info=True)
            self._drop_conn()

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        conn = self._conn()
        with self._wlock:
            try:
                return _busy_retry(lambda: conn.execute(sql, params), self.lock_wait_observer)
            except sqlite3.Error as exc:
                self._after_write_error(exc)
                raise

    def _after_write_error(self, exc: sqlite3.Error) -> None:
        """A write failed: when for lack of space, give the WAL's space back for the next one."""
        if _disk_full(exc):
            log.error("outbox write failed (%s): truncating the WAL to give its space back", exc)
            self._checkpoint()

    def maintain(self) -> None:
        """The engine's periodic upkeep (module docstring): a ``PASSIVE`` checkpoint, which waits
        for no reader or writer, then a ``RESTART`` one once the WAL holds ``RESTART_FRAMES``; or,
        once every ``CHECKPOINT_INTERVAL``, a ``TRUNCATE`` one that gives the WAL's disk space back
        (under this process's write lock, like any write)."""
        conn = self._conn()
        if time.monotonic() - self._checkpointed_at >= CHECKPOINT_INTERVAL:
            with self._wlock:
                self._checkpoint()
            return
        try:
            _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames < RESTART_FRAMES:
                return
            # Writers never pause under a steady load, so a WAL only ever copied back would only
            # grow: SQLite starts it over at a writer that finds every frame copied, and one always
            # wrote meanwhile. RESTART holds writers off for what is left to copy (little, just
            # after the PASSIVE) and starts it over, waiting up to RESTART_WAIT_MS for the writer
            # and the readers in the WAL to finish (busy_timeout 0 would make it give up at once).
            with self._wlock:
                conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
                try:
                    busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                finally:
                    conn.execute("PRAGMA busy_timeout=0")
            if busy and frames >= AUTOCHECKPOINT_FRAMES:
                # Now every commit checkpoints too (SQLite's safety net): it works, but on the
                # accept path again. Said once a minute at most.
                self._warn(f"the WAL holds {frames} frames and could not be started over; retrying")
        except sqlite3.Error as exc:
            self._warn(f"WAL checkpoint failed: {exc}")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning("%s", message)

    def _checkpoint(self) -> None:
        """``wal_checkpoint(TRUNCATE)``, best effort: it gives up at once while a reader is active
        (busy_timeout=0) and is tried again after the next failure or interval. Caller holds _wlock."""
        self._checkpointed_at = time.monotonic()
        try:
            self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed: %s", exc)

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        conn = self._conn()
        return _busy_retry(lambda: conn.execute(sql, params).fetchall(), self.lock_wait_observer)

    # --- the accept path ------------------------------------------------------------------------

    def add(self, record: Record, *, owner: str | None, lease: float) -> tuple[Record, bool]:
        now = time.time()
        inserted = self._adds.write(
            (
                record.id,
                record.cid,
                record.event_id,
                record.transaction_id,
                record.dedupe_key,
                record.fingerprint,
                payload_json(record.payload),
                record.received_at,
                "pending",
                1 if owner else 0,
                now + lease if owner else now,
                owner,
                0,  # uncertain; last_status, last_answer, last_error: NULL (_EMPTY_AT_INSERT)
                now,  # updated_at; delivered_at, latency_ms: NULL
                record.requeued_at,  # set only by outbox move (a requeued record keeps its window)
                record.event_uuid,
                record.cid,
            )
        )
        if inserted:
            record.state, record.lease_owner, record.updated_at = "pending", owner, now
            record.attempts, record.next_at = (1 if owner else 0), (now + lease if owner else now)
            return record, True
        existing = self.get(record.id)
        if existing is None and record.event_uuid != record.id:
            legacy = self.get(record.event_uuid)
            existing = legacy if legacy is not None and legacy.cid == record.cid else None
        if existing is None and record.dedupe_key:
            rows = self._read(
                f"SELECT {', '.join(_COLUMNS)} FROM events WHERE dedupe_key = ? AND state != 'dead'",
                (record.dedupe_key,),
            )
            existing = _row_to_record(rows[0]) if rows else None
        if existing is None:  # the conflicting row went dead in between: try once more
            return self.add(record, owner=owner, lease=lease)
        return existing, False

    def _insert_batch(self, batch: list[Write]) -> None:
        """One transaction for the batch; if it fails, each add alone, so that one add's error
        (a full disk, a bad value) is that add's answer and not its neighbours'. Caller holds _wlock."""
        conn = self._conn()
        try:
            inserted = _busy_retry(
                lambda: self._insert_all(conn, [add.value for add in batch]),
                self.lock_wait_observer,
                "insert",
            )
        except sqlite3.Error as exc:
            if len(batch) == 1:
                self._after_write_error(exc)
                batch[0].error = exc
                return
            for add in batch:
                rows = [add.value]
                try:
                    add.result = _busy_retry(
                        lambda rows=rows: self._insert_all(conn, rows),  # type: ignore[misc]
                        self.lock_wait_observer,
                        "insert",
                    )[0]
                except sqlite3.Error as add_exc:
                    self._after_write_error(add_exc)
                    add.error = add_exc
            return
        for add, was_inserted in zip(batch, inserted, strict=True):
            add.result = was_inserted

    def _insert_all(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[bool]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            inserted = [conn.execute(_INSERT_SQL, params).rowcount == 1 for params in rows]
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        return inserted

    # --- delivery ----------------------------------------------------------------------------------

    def claim(self, owner: str, limit: int, lease: float) -> list[Record]:
        conn = self._conn()
        with self._wlock:
            try:
                return _busy_retry(
                    lambda: self._claim(conn, owner, limit, lease), self.lock_wait_observer, "claim"
                )
            except sqlite3.Error as exc:
                self._after_write_error(exc)
                raise

    def _claim(self, conn: sqlite3.Connection, owner: str, limit: int, lease: float) -> list[Record]:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # A record whose lease expired with an owner still set was being delivered by a worker
            # that died or hung: its attempt may have reached Pingtree, so it becomes uncertain.
            rows = conn.execute(
                f"UPDATE events SET lease_owner = ?, next_at = ?, attempts = attempts + 1, updated_at = ?, "
                "uncertain = CASE WHEN lease_owner IS NOT NULL THEN 1 ELSE uncertain END "
                "WHERE id IN (SELECT id FROM events WHERE state = 'pending' AND next_at <= ? "
                "ORDER BY next_at LIMIT ?) "
                f"RETURNING {', '.join(_COLUMNS)}",
                (owner, now + lease, now, now, limit),
            ).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        return [_row_to_record(r) for r in rows]

    def finish_many(self, outcomes: Sequence[Outcome]) -> list[bool]:
        if not outcomes:
            return []
        conn = self._conn()
        with self._wlock:
            try:
                return _busy_retry(
                    lambda: self._finish_many(conn, outcomes), self.lock_wait_observer, "settle"
                )
            except sqlite3.Error as exc:
                self._after_write_error(exc)
                raise

    def _finish_many(self, conn: sqlite3.Connection, outcomes: Sequence[Outcome]) -> list[bool]:
        # One write transaction per batch: a commit (and its WAL append) is most of an UPDATE's cost.
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = [
                conn.execute(
                    _FINISH_SQL,
                    (
                        o.state,
                        o.next_at,
                        o.status,
                        json.dumps(o.answer) if o.answer is not None else None,
                        o.error,
                        1 if o.uncertain else 0,
                        now,
                        o.latency_ms,
                        o.state,
                        now,
                        o.record_id,
                        o.owner,
                        o.attempts,
                        o.attempts,
                    ),
                ).rowcount
                == 1
                for o in outcomes
            ]
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        return done

    def backlog(self, limit: int) -> int:
        rows = self._read(
            "SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE state = 'pending' AND next_at <= ? LIMIT ?)",
            (time.time(), limit),
        )
        return int(rows[0][0])

    def release(self, record_ids: Iterable[str], owner: str) -> int:
        ids = list(record_ids)
        now = time.time()
        count = 0
        for rid in ids:
            # attempts was counted at claim; this one never happened.
            cur = self._write(
                "UPDATE events SET lease_owner = NULL, next_at = ?, attempts = MAX(0, attempts - 1) "
                "WHERE id = ? AND lease_owner = ? AND state = 'pending'",
                (now, rid, owner),
            )
            count += cur.rowcount
        return count

    # --- reading and operating ---------------------------------------------------------------------

    def get(self, record_id: str) -> Record | None:
        rows = self._read(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE id = ?", (record_id,))
        return _row_to_record(rows[0]) if rows else None

    def find(
        self,
        *,
        state: State | None = None,
        cid: str | None = None,
        event_id: str | None = None,
        transaction_id: str | None = None,
        limit: int = 50,
    ) -> list[Record]:
        where, params = [], []
        for column, value in (
            ("state", state),
            ("cid", cid),
            ("event_id", event_id),
            ("transaction_id", transaction_id),
        ):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY received_at DESC LIMIT ?"
        rows = self._read(sql, (*params, limit))
        return [_row_to_record(r) for r in rows]

    def stats(self) -> Stats:
        counts = {s: 0 for s in ("pending", "delivered", "dead")}
        for state, n in self._read("SELECT state, COUNT(*) FROM events GROUP BY state"):
            counts[state] = n
        oldest = self._read("SELECT MIN(received_at) FROM events WHERE state = 'pending'")[0][0]
        return Stats(counts=counts, oldest_pending_age=max(0.0, time.time() - oldest) if oldest else 0.0)

    def requeue(self, *, ids: Iterable[str] = (), cid: str | None = None, everything: bool = False) -> int:
        if everything:
            targets = [r[0] for r in self._read("SELECT id FROM events WHERE state = 'dead'")]
        elif cid:
            targets = [
                r[0] for r in self._read("SELECT id FROM events WHERE state = 'dead' AND cid = ?", (cid,))
            ]
        else:
            targets = list(ids)
        now, count = time.time(), 0
        for rid in targets:
            try:
                cur = self._write(
                    "UPDATE events SET state = 'pending', next_at = ?, lease_owner = NULL, updated_at = ?, "
                    "requeued_at = ? WHERE id = ? AND state = 'dead'",
                    (now, now, now, rid),
                )
                count += cur.rowcount
            except sqlite3.IntegrityError:
                continue  # a live event with the same dedupe key exists: re-queueing would duplicate it
        return count

    def purge(self, *, state: str, older_than: float = 0.0) -> int:
        if state not in ("delivered", "dead"):
            raise ValueError("only delivered or dead records can be purged")
        cur = self._write(
            "DELETE FROM events WHERE state = ? AND updated_at <= ?", (state, time.time() - older_than)
        )
        return cur.rowcount

    def timeline(self, since: float) -> list[tuple[int, str, int]]:
        rows = self._read(
            "SELECT CAST(received_at / 60 AS INTEGER) * 60 AS minute, "
            "CASE WHEN state = 'pending' AND attempts > 0 THEN 'retrying' "
            "WHEN state = 'pending' THEN 'queued' ELSE state END AS outcome, COUNT(*) "
            "FROM events WHERE received_at >= ? GROUP BY minute, outcome ORDER BY minute",
            (since,),
        )
        return [(int(m), o, int(n)) for m, o, n in rows]

    def delete(self, record_ids: Iterable[str]) -> int:
        """Delete records whatever their state: only ``outbox move`` does, after copying them elsewhere."""
        return sum(self._write("DELETE FROM events WHERE id = ?", (rid,)).rowcount for rid in record_ids)

    def journal_bytes(self) -> int | None:
        # What the engine's upkeep keeps small and gives back once a minute (maintain()).
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:  # no WAL yet (or a :memory: store)
            return 0

    def ping(self) -> bool:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    def check_writable(self) -> str | None:
        conn = self._conn()
        try:
            with self._wlock:
                _busy_retry(lambda: self._probe(conn), self.lock_wait_observer)
        except sqlite3.Error as exc:
            with self._wlock:
                self._after_write_error(exc)
            return f"the outbox refuses writes: {exc}"
        return None

    def _probe(self, conn: sqlite3.Connection) -> None:
        # Insert before delete: the new row needs space of its own, as an event would.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO write_probe (at, filler) VALUES (?, zeroblob(?))", (time.time(), PROBE_BYTES)
            )
            conn.execute("DELETE FROM write_probe WHERE rowid != last_insert_rowid()")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    def persistence(self) -> Persistence:
        return Persistence("ok", "SQLite file in WAL mode (synchronous=NORMAL): survives a process crash")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
