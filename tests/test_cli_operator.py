"""The command line as an operator meets it: --version, help on every option, options in any order,
purge that asks before deleting, config typos with a suggestion, backup, schema versions, and the
SQLite -> Redis move. The installed ``pingtree-relay`` is run where the behaviour is the process's."""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import redis

from server.build import version
from server.cli import build_parser, main
from server.config import load_config
from server.outbox import Record, Store, open_store
from server.outbox.schema import REDIS_SCHEMA_VERSION, StoreTooNew
from server.outbox.sqlite import _MIGRATIONS, SQLiteStore
from tests.conftest import write_relay_config

pytest_plugins = ["tests.redis_fixture"]

CAMPAIGNS = """
[campaigns.cmp_a]
allowed_origins = ["https://www.example.com"]
[campaigns.cmp_a.events.signup]
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command (``pip install .`` put it on PATH), as an operator types it."""
    return subprocess.run(["pingtree-relay", *args], capture_output=True, text=True, timeout=60)


def config_file(tmp_path: Path, store: str | None = None) -> Path:
    return write_relay_config(
        tmp_path / "relay.toml",
        upstream="http://127.0.0.1:1",
        store=store or f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        campaigns=CAMPAIGNS,
    )


def record(rid: str, age: float = 0.0) -> Record:
    return Record(
        id=rid,
        cid="cmp_a",
        event_id="signup",
        transaction_id=f"t-{rid}",
        payload={"n": rid},
        received_at=time.time() - age,
        dedupe_key=f"cmp_a|t-{rid}|signup",
    )


def finish_dead(store: Store, rid: str, owner: str = "w") -> None:
    """The leased record ``rid`` answered 400 by Pingtree: a dead letter."""
    store.finish(
        rid,
        owner,
        state="dead",
        next_at=0,
        status=400,
        answer=None,
        error="400 x",
        uncertain=False,
        latency_ms=1.0,
    )


def test_version() -> None:
    done = cli("--version")
    assert done.returncode == 0 and done.stdout == f"pingtree-relay {version()}\n"
    assert version()[0].isdigit()


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def test_every_option_has_help_and_no_markup() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) >= 13  # the commands and the outbox actions
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), (
                f"{parser.prog} {action.option_strings or action.dest}"
            )
        text = parser.format_help()
        for markup in ("``", ":func:", ":class:", ".. "):
            assert markup not in text, f"reST markup {markup!r} in `{parser.prog} --help`:\n{text}"


def test_check_config_takes_the_file_as_argument_or_option(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    for args in (["check-config", str(path)], ["check-config", "--config", str(path)]):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{path}: OK (1 campaigns, 1 events)\nstore: SQLite file /")


def test_unknown_keys_suggest_the_nearest_valid_one(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[relay]\nupstream_ulr = "https://api.pingtree.com"\n')
    done = cli("check-config", str(path))
    assert done.returncode == 1
    assert done.stderr == f"{path}: relay.upstream_ulr: unknown key; did you mean `upstream_url`?\n"
    path.write_text(
        '[relay]\nupstream_url = "https://api.pingtree.com"\n[campaigns.c.events.sale]\nconversoin = true\n'
    )
    assert (
        "campaigns.c.events.sale.conversoin: unknown key; did you mean `conversion`?"
        in cli("check-config", str(path)).stderr
    )


def test_outbox_retry_takes_options_before_the_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path)
    store = open_store(load_config(path).relay.store)
    for rid in ("ev-1", "ev-2"):
        store.add(record(rid), owner="w", lease=30)
        finish_dead(store, rid)
    assert main(["outbox", "retry", "--config", str(path), "ev-1", "ev-2"]) == 0
    assert capsys.readouterr().out == "re-queued 2 dead letters\n"
    assert store.stats().counts["pending"] == 2
    store.close()


def test_purge_without_an_age_or_all_deletes_nothing(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    store = open_store(load_config(path).relay.store)
    store.add(record("ev-old"), owner="w", lease=30)
    store.finish(
        "ev-old",
        "w",
        state="delivered",
        next_at=0,
        status=200,
        answer={},
        error=None,
        uncertain=False,
        latency_ms=1.0,
    )
    done = cli("outbox", "purge", "--config", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert (
        "--older-than 7d" in done.stderr and "--all" in done.stderr and "Nothing was deleted" in done.stderr
    )
    assert "purge deletes delivered events" in done.stderr
    assert store.stats().counts["delivered"] == 1
    done = cli("outbox", "purge", "--older-than", "1d", "--config", str(path))
    assert (done.returncode, done.stdout) == (
        0,
        "purged 0 delivered events (last updated more than 1d ago)\n",
    )
    bad = cli("outbox", "purge", "--older-than", "soon", "--config", str(path))
    assert bad.returncode == 2 and "expected a duration like 7d" in bad.stderr
    done = cli("outbox", "purge", "--all", "--config", str(path))
    assert (done.returncode, done.stdout) == (0, "purged 1 delivered events (all of them)\n")
    assert store.stats().counts["delivered"] == 0
    store.close()


def test_backup_while_the_store_is_open(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    store = open_store(load_config(path).relay.store)
    for i in range(50):
        store.add(record(f"ev-{i}"), owner=None, lease=30)
    copy = tmp_path / "backup.sqlite3"
    done = cli("outbox", "backup", str(copy), "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"backed up the outbox to {copy} (")
    assert SQLiteStore(str(copy)).stats().counts["pending"] == 50
    again = cli("outbox", "backup", str(copy), "--config", str(path))
    assert again.returncode == 1 and "exists already" in again.stderr
    store.close()


@pytest.mark.redis
def test_backup_of_a_redis_store_points_at_redis_persistence(tmp_path: Path, redis_url: str) -> None:
    done = cli("outbox", "backup", str(tmp_path / "b"), "--config", str(config_file(tmp_path, redis_url)))
    assert done.returncode == 1 and "Redis's own persistence" in done.stderr


def test_an_old_store_is_upgraded_and_a_newer_one_refused(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite3"
    known = len(_MIGRATIONS)
    conn = sqlite3.connect(db)
    conn.executescript(_MIGRATIONS[0])  # as written before schema versions existed: version 0
    conn.commit()
    SQLiteStore(str(db)).close()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == known
    assert "fingerprint" in {row[1] for row in conn.execute("PRAGMA table_info(events)")}  # migration 2
    conn.execute("PRAGMA user_version = 7")  # as a future release would leave it
    conn.commit()
    conn.close()
    with pytest.raises(StoreTooNew):
        SQLiteStore(str(db))
    done = cli("serve", "--config", str(config_file(tmp_path)), "--port", "0")
    assert done.returncode == 1
    assert "has schema version 7, but this pingtree-relay" in done.stderr
    assert f"knows versions up to {known}" in done.stderr


@pytest.mark.redis
def test_an_older_redis_store_is_marked_current_and_a_newer_one_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = "ptr:schema"
    client.set(key, 1)  # as a release before requeued_at left it: that release must refuse it now
    open_store(redis_url).close()
    assert int(str(client.get(key))) == REDIS_SCHEMA_VERSION == 2
    client.set(key, 9)  # a future release's
    with pytest.raises(StoreTooNew):
        open_store(redis_url)
    client.set(key, REDIS_SCHEMA_VERSION)
    client.close()


@pytest.mark.redis
def test_move_from_sqlite_to_redis(tmp_path: Path, redis_url: str) -> None:
    old_url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = open_store(old_url)
    for i in range(5):
        old.add(record(f"ev-{i}", age=100 - i), owner="w" if i == 4 else None, lease=30)
    finish_dead(old, "ev-4")  # a dead letter, then requeued
    assert old.requeue(ids=["ev-4"]) == 1
    requeued_at = old.get("ev-4").requeued_at  # type: ignore[union-attr]
    assert requeued_at is not None
    old.add(record("ev-done"), owner="w", lease=30)
    old.finish(
        "ev-done",
        "w",
        state="delivered",
        next_at=0,
        status=200,
        answer={"status": 200},
        error=None,
        uncertain=False,
        latency_ms=3.0,
    )
    path = config_file(tmp_path, redis_url)
    new = open_store(redis_url)
    new.add(record("ev-0", age=100), owner=None, lease=30)  # a browser's retry reached Redis first

    done = cli("outbox", "move", "--from", old_url, "--config", str(path), "--history")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "moved 4 pending events (1 were in the new store already); copied 1 delivered or dead events\n"
    )
    assert new.stats().counts == {"pending": 5, "delivered": 1, "dead": 0}
    assert [r.id for r in reversed(new.find(state="pending"))] == [f"ev-{i}" for i in range(5)]
    assert new.get("ev-3").payload == {"n": "ev-3"}  # type: ignore[union-attr]
    assert new.get("ev-4").requeued_at == requeued_at  # type: ignore[union-attr]  # its max_age window
    assert new.get("ev-3").requeued_at is None  # type: ignore[union-attr]
    assert old.stats().counts["pending"] == 0  # nothing left to be sent twice from the old file
    again = cli("outbox", "move", "--from", old_url, "--config", str(path))
    assert again.stdout.startswith("moved 0 pending events")
    same = cli("outbox", "move", "--from", redis_url, "--config", str(path))
    assert same.returncode == 1 and "give the old store's URL" in same.stderr
    old.close()
    new.close()


@pytest.mark.redis
def test_move_refuses_while_a_relay_delivers_from_the_old_store(tmp_path: Path, redis_url: str) -> None:
    old_url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = open_store(old_url)
    old.add(record("ev-busy"), owner="worker-1", lease=30)  # leased: an attempt is in flight
    done = cli("outbox", "move", "--from", old_url, "--config", str(config_file(tmp_path, redis_url)))
    assert done.returncode == 1 and "restart the relay on the new store first" in done.stderr
    assert old.stats().counts["pending"] == 1 and open_store(redis_url).stats().counts["pending"] == 0
    old.close()
