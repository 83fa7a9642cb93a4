"""Dashboard sessions and failed-login counts, kept server-side where every worker and node sees them.

A session is a random id (in the signed cookie) whose record lives next to the outbox: a table in
the same SQLite file, or keys in the same Redis. So logging out ends the session for good (a copy
of the cookie is worth nothing afterwards), and changing the admin token ends every session (each
record holds an HMAC of its id keyed with the token it was opened under). Only digests are stored:
the session id's SHA-256 and the client address's, never the id or the address itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from typing import Protocol

import redis


class SessionStore(Protocol):
    def open(self, token: str, lifetime: float) -> str:
        """A new session id, valid for ``lifetime`` seconds while the admin token is ``token``."""

    def valid(self, session_id: str, token: str) -> bool: ...

    def revoke(self, session_id: str) -> None: ...

    def count_failure(self, client: str, window: float) -> int:
        """Count one failed login of ``client`` in the current ``window``; returns the window's count."""

    def failures(self, client: str, window: float) -> int: ...


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _bound(session_id: str, token: str) -> str:
    """What ties a session to the token it was opened under."""
    return hmac.new(
        token.encode(), b"pingtree-relay admin session|" + session_id.encode(), hashlib.sha256
    ).hexdigest()


def _window(window: float, now: float) -> int:
    return int(now // window)


class SQLiteSessions:
    """Two small tables in the outbox's SQLite file; a connection per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            # On first use, not at start: a relay without a dashboard never writes these tables, and
            # one whose disk is full still boots.
            conn.executescript(
                "CREATE TABLE IF NOT EXISTS admin_sessions (id TEXT PRIMARY KEY, bound TEXT NOT NULL, "
                "expires REAL NOT NULL);"
                "CREATE TABLE IF NOT EXISTS admin_login_failures (client TEXT NOT NULL, win INTEGER NOT NULL, "
                "count INTEGER NOT NULL, PRIMARY KEY (client, win));"
            )
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def open(self, token: str, lifetime: float) -> str:
        session_id, now = secrets.token_urlsafe(32), time.time()
        conn = self._conn()
        conn.execute("DELETE FROM admin_sessions WHERE expires < ?", (now,))
        conn.execute(
            "INSERT INTO admin_sessions VALUES (?, ?, ?)",
            (_digest(session_id), _bound(session_id, token), now + lifetime),
        )
        return session_id

    def valid(self, session_id: str, token: str) -> bool:
        row = (
            self._conn()
            .execute(
                "SELECT bound FROM admin_sessions WHERE id = ? AND expires >= ?",
                (_digest(session_id), time.time()),
            )
            .fetchone()
        )
        return row is not None and hmac.compare_digest(row[0], _bound(session_id, token))

    def revoke(self, session_id: str) -> None:
        self._conn().execute("DELETE FROM admin_sessions WHERE id = ?", (_digest(session_id),))

    def count_failure(self, client: str, window: float) -> int:
        now = time.time()
        conn = self._conn()
        conn.execute("DELETE FROM admin_login_failures WHERE win < ?", (_window(window, now) - 1,))
        row = conn.execute(
            "INSERT INTO admin_login_failures VALUES (?, ?, 1) ON CONFLICT (client, win) "
            "DO UPDATE SET count = count + 1 RETURNING count",
            (_digest(client), _window(window, now)),
        ).fetchone()
        return int(row[0])

    def failures(self, client: str, window: float) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT count FROM admin_login_failures WHERE client = ? AND win = ?",
                (_digest(client), _window(window, time.time())),
            )
            .fetchone()
        )
        return int(row[0]) if row else 0


class RedisSessions:
    """Keys with an expiry in the outbox's Redis (``ptr:admin:...``)."""

    def __init__(self, url: str, *, prefix: str = "ptr:admin:") -> None:
        self.url, self.prefix = url, prefix
        self._client: redis.Redis | None = None
        self._pid = -1

    def _redis(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():  # a pool must not cross a fork
            self._client = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5.0)
            self._pid = os.getpid()
        return self._client

    def open(self, token: str, lifetime: float) -> str:
        session_id = secrets.token_urlsafe(32)
        self._redis().set(
            f"{self.prefix}session:{_digest(session_id)}", _bound(session_id, token), ex=max(1, int(lifetime))
        )
        return session_id

    def valid(self, session_id: str, token: str) -> bool:
        bound = self._redis().get(f"{self.prefix}session:{_digest(session_id)}")
        return isinstance(bound, str) and hmac.compare_digest(bound, _bound(session_id, token))

    def revoke(self, session_id: str) -> None:
        self._redis().delete(f"{self.prefix}session:{_digest(session_id)}")

    def _failure_key(self, client: str, window: float) -> str:
        return f"{self.prefix}failures:{_digest(client)}:{_window(window, time.time())}"

    def count_failure(self, client: str, window: float) -> int:
        key = self._failure_key(client, window)
        pipe = self._redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, max(1, int(window * 2)))
        return int(pipe.execute()[0])

    def failures(self, client: str, window: float) -> int:
        return int(self._redis().get(self._failure_key(client, window)) or 0)


def open_sessions(store_url: str) -> SessionStore:
    """The session store next to the outbox at ``store_url`` (see :func:`server.outbox.open_store`)."""
    if store_url.startswith("redis://"):
        return RedisSessions(store_url)
    return SQLiteSessions(store_url[len("sqlite:///") :])
