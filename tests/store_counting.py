"""Counting what a store really does: SQLite write transactions, Redis script calls.

Counted at the lowest level each backend offers from the outside, so a test of batching cannot be
fooled by a method that loops inside: SQLite's own statement trace (every ``COMMIT`` on the
store's connections, one per write transaction) and Redis's server-side ``INFO commandstats``
(``EVALSHA``/``EVAL`` calls: every state change is one script).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from server.outbox import Store
from server.outbox.redis import RedisStore
from server.outbox.sqlite import SQLiteStore


def redis_script_calls(url: str) -> int:
    """Script calls the Redis server has run since it started (all clients)."""
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    # A NOSCRIPT reply (redis-py then loads the script and calls again) ran nothing: not counted.
    return sum(
        int(entry.get("calls", 0)) - int(entry.get("failed_calls", 0)) - int(entry.get("rejected_calls", 0))
        for entry in (stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval"))
    )


@contextmanager
def count_store_writes(store: Store) -> Iterator[Callable[[], int]]:
    """Within the block: SQLite commits on ``store``'s connections (and SQLite autocommit writes),
    or Redis script calls. Yields a function returning the count so far."""
    if isinstance(store, RedisStore):
        start = redis_script_calls(store.url)
        yield lambda: redis_script_calls(store.url) - start
        return
    assert isinstance(store, SQLiteStore)
    seen: list[str] = []
    original = store._conn

    def traced() -> sqlite3.Connection:
        conn = original()
        conn.set_trace_callback(seen.append)
        return conn

    store._conn = traced  # type: ignore[method-assign]
    try:
        yield lambda: sqlite_write_transactions(seen)
    finally:
        store._conn = original  # type: ignore[method-assign]
        original().set_trace_callback(None)


def sqlite_write_transactions(statements: list[str]) -> int:
    """Write transactions in a statement trace: each COMMIT, plus each write run in autocommit."""
    count, in_transaction = 0, False
    for statement in statements:
        word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        if word == "BEGIN":
            in_transaction = True
        elif word in ("COMMIT", "ROLLBACK"):
            count += word == "COMMIT"
            in_transaction = False
        elif word in ("INSERT", "UPDATE", "DELETE") and not in_transaction:
            count += 1
    return count
