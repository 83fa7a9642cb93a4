"""Schema versions of the stores: migrations applied at start, a store newer than the code refused.

An upgrade is "install the new version, restart": each process opening a store brings it up to the
version this code knows, in one transaction, so a half-applied migration never exists. A store
written by a newer relay (a rollback after an upgrade) is refused with a message instead of being
read with the wrong layout: events must not be lost to a column the old code does not know.

SQLite keeps its version in ``PRAGMA user_version``; Redis in the ``{prefix}schema`` key. A store
created before versions existed reads as version 0 and is identical to version 1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any


class StoreTooNew(RuntimeError):
    """The store was written by a newer pingtree-relay than this one."""

    def __init__(self, where: str, found: int, known: int) -> None:
        from ..build import version

        super().__init__(
            f"{where} has schema version {found}, but this pingtree-relay ({version()}) knows versions up "
            f"to {known}: it was upgraded by a newer release. Install that release again (or newer); "
            "do not downgrade a store."
        )
        self.found, self.known = found, known


def statements(script: str) -> Iterator[str]:
    """The SQL statements of ``script``, one by one (``executescript`` would commit our transaction)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""
    if buffer.strip() and not buffer.strip().startswith("--"):
        yield buffer


def upgrade_sqlite(conn: sqlite3.Connection, migrations: Sequence[str], where: str) -> int:
    """Apply ``migrations[v:]`` to a store at version ``v``; returns the version now.

    ``migrations[0]`` creates the baseline (version 1). ``BEGIN IMMEDIATE`` first: two workers
    starting together take turns, and the second finds the work done.
    """
    known = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > known:
            raise StoreTooNew(where, current, known)
        for script in migrations[current:]:
            for statement in statements(script):
                conn.execute(statement)
        if current != known:
            conn.execute(f"PRAGMA user_version = {known:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return known


# 2: records may carry ``requeued_at`` (a requeue's new max_age window). Nothing to rewrite: a
# record without it reads as never requeued; but a release knowing version 1 cannot read a record
# with it, so the store says 2 from the first start of this code on.
REDIS_SCHEMA_VERSION = 2


def check_redis(client: Any, prefix: str, where: str) -> int:
    """Bring a new, pre-version or older Redis store to this code's version; refuse a newer one.

    Redis's migrations add fields only (no data to rewrite), so bringing it up is raising the
    marker; a script does it, so that two processes starting together cannot lower it."""
    key = f"{prefix}schema"
    found = int(
        client.eval(
            "local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
            "if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1] end "
            "return v",
            1,
            key,
            REDIS_SCHEMA_VERSION,
        )
    )
    if found > REDIS_SCHEMA_VERSION:
        raise StoreTooNew(where, found, REDIS_SCHEMA_VERSION)
    return found
