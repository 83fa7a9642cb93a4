"""A store that refuses writes (full disk, Redis OOM or MISCONF) makes the relay unready, and it
recovers by itself once the store takes writes again, delivering what it held.

End to end on real gunicorn relays (``pingtree-relay serve``), real SQLite files and a real
redis-server. The "full disk" is SQLite's ``PRAGMA max_page_count``, set on every connection of
the relay through ``PINGTREE_RELAY_SQLITE_MAX_PAGE_COUNT``; freeing space is deleting a ballast
table in the same file, as an operator would delete a file on the same filesystem.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis

from server.outbox import Record
from server.outbox.redis import RedisStore
from server.outbox.sqlite import MAX_PAGE_COUNT_ENV, SQLiteStore
from tests.conftest import InProcessRelay, InProcessRelayFactory, Relay, RelayFactory, Sandbox, wait_for

if TYPE_CHECKING:
    from tests.redis_fixture import RedisServer

pytest_plugins = ["tests.redis_fixture"]


def record(i: int, size: int = 600) -> Record:
    return Record(
        id=f"ev-{i:05d}",
        cid="cmp_test",
        event_id="quote_viewed",
        transaction_id=f"t-{i}",
        payload={"filler": "x" * size},
        received_at=time.time(),
    )


def readyz(relay: Relay | InProcessRelay) -> httpx.Response:
    return relay.request("GET", "/readyz", timeout=10)


def post_until_refused(relay: Relay, limit: int = 400) -> list[str]:
    """Post events until the relay answers 503; returns the transaction ids it accepted."""
    accepted = []
    for i in range(limit):
        answer = relay.post(
            {"event_id": "quote_viewed", "transaction_id": f"full-{i}", "quote_id": "q" * 200}
        )
        if answer.status_code == 503:
            assert answer.headers["Retry-After"]
            return accepted
        assert answer.status_code in (200, 202), answer.text
        accepted.append(f"full-{i}")
    raise AssertionError(f"the store never filled up in {limit} events")


# --- SQLite ----------------------------------------------------------------------------------------


class AutoRollbackConnection:
    """A real connection whose COMMIT fails the way SQLITE_FULL does on a real disk: SQLite rolls
    the transaction back by itself, then reports the error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self.conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_failed_claim_reports_the_real_error_not_the_rollback(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "o.sqlite3"))
    store.add(record(1), owner=None, lease=30)
    real = store._conn()
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store._claim(AutoRollbackConnection(real), "w1", 10, 30)  # type: ignore[arg-type]
    assert not real.in_transaction
    assert [r.id for r in store.claim("w1", 10, 30)] == ["ev-00001"]  # the store still works


def test_a_write_that_fails_for_space_truncates_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "o.sqlite3"
    SQLiteStore(str(path)).close()
    monkeypatch.setenv(MAX_PAGE_COUNT_ENV, "60")
    store = SQLiteStore(str(path))
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for i in range(1000):
            store.add(record(i), owner=None, lease=30)
    # The WAL had grown with every insert; its space is given back for the next writes.
    assert Path(f"{path}-wal").stat().st_size == 0
    assert store.check_writable() is not None  # and readiness says so
    assert store.ping()  # while a read still works: why SELECT 1 is not readiness


def test_sqlite_full_disk_makes_the_relay_unready_and_it_recovers_by_itself(
    relay_factory: RelayFactory, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relay.sqlite3"
    SQLiteStore(str(path)).close()
    with sqlite3.connect(path) as db:  # space the "operator" frees later
        db.execute("CREATE TABLE ballast (b BLOB)")
        db.executemany("INSERT INTO ballast VALUES (zeroblob(4000))", [()] * 40)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    monkeypatch.setenv(MAX_PAGE_COUNT_ENV, str(pages + 12))
    sandbox.fault(status=500)  # Pingtree down: what arrives is held in the outbox
    relay = relay_factory(store=f"sqlite:///{path}", workers=1)

    held = post_until_refused(relay)
    assert held  # some got in before the disk filled
    answer = readyz(relay)
    assert answer.status_code == 503, answer.text
    assert answer.json()["store"] == "unwritable" and answer.json()["status"] == "unavailable"

    with sqlite3.connect(path) as db:  # the operator frees space
        db.execute("DROP TABLE ballast")
    sandbox.clear_faults()
    wait_for(lambda: readyz(relay).status_code == 200, timeout=20, message="/readyz ready again")
    fresh = relay.post({"event_id": "quote_viewed", "transaction_id": "after-recovery"})
    assert fresh.status_code in (200, 202), fresh.text
    wanted = set(held) | {"after-recovery"}
    wait_for(
        lambda: wanted <= {e["transaction_id"] for e in sandbox.events()},
        timeout=40,
        message="every held event delivered",
    )
    assert "cannot rollback" not in relay.log()


# --- Redis -----------------------------------------------------------------------------------------


def test_redis_oom_makes_the_relay_unready_with_503_and_it_recovers(
    relay_factory: RelayFactory, sandbox: Sandbox, redis_url: str, redis_server: RedisServer
) -> None:
    relay = relay_factory(store=redis_url, workers=1)
    control = redis_server.client()
    try:
        control.config_set("maxmemory", "1")  # noeviction: every write is refused with OOM
        answer = relay.post({"event_id": "quote_viewed", "transaction_id": "oom-1"})
        assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
        ready = wait_for(
            lambda: (r := readyz(relay)).status_code == 503 and r,
            timeout=10,
            message="/readyz unready under OOM",
        )
        assert ready.json()["store"] == "unwritable" and "maxmemory" in ready.json()["store_error"]
    finally:
        control.config_set("maxmemory", "0")
    wait_for(lambda: readyz(relay).status_code == 200, timeout=10, message="/readyz ready again")
    answer = relay.post({"event_id": "quote_viewed", "transaction_id": "oom-2"})
    assert answer.status_code in (200, 202), answer.text
    wait_for(lambda: sandbox.events(transaction_id="oom-2"), message="delivered after OOM")


def test_redis_misconf_refuses_writes_and_readiness_says_so(tmp_path: Path) -> None:
    """MISCONF: a snapshot failed (its directory is gone) and Redis stops taking writes."""
    from tests.redis_fixture import RedisServer, redis_binary  # here: the plugin must load it first

    workdir = tmp_path / "redis-misconf"
    workdir.mkdir()
    server = RedisServer(redis_binary(), workdir).start()
    try:
        control = server.client()
        control.config_set("save", "3600 1")
        store = RedisStore(server.url)
        assert store.check_writable() is None
        shutil.rmtree(workdir)
        control.bgsave()
        wait_for(
            lambda: control.info("persistence")["rdb_last_bgsave_status"] == "err",
            timeout=10,
            message="the snapshot to fail",
        )
        assert "MISCONF" in (store.check_writable() or "")
        with pytest.raises(redis.ResponseError, match="MISCONF"):
            store.add(record(1), owner=None, lease=30)
        control.config_set("save", "")  # the operator turns the failing snapshots off
        assert store.check_writable() is None
        assert store.add(record(1), owner=None, lease=30)[1]
    finally:
        server.stop()


def test_redis_persistence_is_checked_at_start_and_reported(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    control = redis_server.client()
    try:
        with caplog.at_level("WARNING", logger="pingtree_relay.outbox"):
            assert (
                RedisStore(redis_url).persistence().state == "off"
            )  # the test server: --save "" --appendonly no
        assert "every queued event" in caplog.text
        control.config_set("save", "3600 1")
        assert RedisStore(redis_url).persistence().state == "snapshots"
        control.config_set("appendonly", "yes")
        found = RedisStore(redis_url).persistence()
        assert found.state == "ok" and "appendfsync" in found.detail
        control.acl_setuser(
            "noconfig", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"]
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="pingtree_relay.outbox"):
            limited = RedisStore(redis_url.replace("redis://", "redis://noconfig:pw@"))
        assert limited.persistence().state == "unknown" and "cannot verify" in caplog.text
    finally:
        control.config_set("appendonly", "no")
        control.config_set("save", "")
        control.acl_deluser("noconfig")


def test_readyz_reports_redis_persistence(app_relay_factory: InProcessRelayFactory, redis_url: str) -> None:
    relay = app_relay_factory(store=redis_url)  # what /readyz says is the app's: no process needed
    body = readyz(relay).json()
    assert body["status"] == "ok"  # reported, not a reason to refuse traffic
    assert body["persistence"]["state"] == "off" and "appendonly yes" in body["persistence"]["detail"]


# --- the dashboard -------------------------------------------------------------------------------


def admin_overview(store_url: str) -> str:
    from server import create_app
    from server.config import parse_config
    from tests.test_admin import TOKEN, logged_in

    config = parse_config(
        {
            "relay": {"upstream_url": "http://pingtree.invalid", "store": store_url, "admin_token": TOKEN},
            "campaigns": {"cmp_a": {"allowed_origins": ["https://shop.example.com"], "events": {"view": {}}}},
        }
    )
    app = create_app(config, start_delivery=False)
    try:
        return str(logged_in(app).get("/admin/").text)
    finally:
        app.extensions["relay"].close()


def test_the_dashboard_shows_redis_without_persistence(redis_url: str) -> None:
    page = admin_overview(redis_url)
    assert 'id="store-persistence"' in page and "every queued event" in page
    assert 'id="store-unwritable"' not in page


def test_the_dashboard_shows_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "full.sqlite3"
    SQLiteStore(str(path)).close()
    with sqlite3.connect(path) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    monkeypatch.setenv(MAX_PAGE_COUNT_ENV, str(pages))  # not one page more: no room for the probe
    page = admin_overview(f"sqlite:///{path}")
    assert 'id="store-unwritable"' in page and "refuses writes" in page
    assert 'id="store-persistence"' not in page
