"""``pingtree-relay outbox stats|list|retry|purge --config``, on a store filled directly (both backends)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import main
from server.outbox import Record, Store, open_store
from tests.conftest import ROOT, write_relay_config

pytest_plugins = ["tests.redis_fixture"]

CAMPAIGNS = """
[campaigns.cmp_a]
allowed_origins = ["https://www.example.com"]
[campaigns.cmp_a.events.signup]
"""


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A relay config whose store is SQLite in ``tmp_path`` or the test Redis."""
    url = (
        f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("redis_url")
    )
    return write_relay_config(
        tmp_path / "relay.toml", upstream="http://127.0.0.1:1", store=url, campaigns=CAMPAIGNS
    )


@pytest.fixture
def store(config: Path) -> Iterator[Store]:
    """The config's store, filled with: 2 pending (one retrying), 1 delivered, 3 dead (2 of cmp_b)."""
    from server.config import load_config

    store = open_store(load_config(config).relay.store)
    now = time.time()

    def add(
        rid: str,
        cid: str,
        age: float,
        outcome: str | None = None,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        store.add(
            Record(
                id=rid,
                cid=cid,
                event_id="signup",
                transaction_id=f"t-{rid}",
                payload={"x": rid},
                received_at=now - age,
                dedupe_key=f"{cid}|t-{rid}|signup",
            ),
            owner="w" if outcome else None,
            lease=30,
        )
        if outcome:
            assert store.finish(
                rid,
                "w",
                state=outcome,
                next_at=now + (600 if outcome == "pending" else 0),
                status=status,
                answer=None,
                error=error,
                uncertain=False,
                latency_ms=5.0,
            )

    add("ev-queued", "cmp_a", 300)
    add("ev-retrying", "cmp_a", 200, "pending", 500, "500 Internal Server Error")
    add("ev-delivered", "cmp_a", 100, "delivered", 200)
    add("ev-dead-a", "cmp_a", 50, "dead", 400, "400 Invalid event_id for this campaign")
    add("ev-dead-b1", "cmp_b", 40, "dead", 400, "400 Missing required fields")
    add("ev-dead-b2", "cmp_b", 30, "dead", 403, "403 Source Inactive")
    yield store
    store.close()


def outbox(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["outbox", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def ids(listing: str) -> list[str]:
    return [line.split()[0] for line in listing.splitlines()]


def test_stats(store: Store, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = outbox(capsys, config, "stats")
    stats = json.loads(out)
    assert code == 0 and stats["counts"] == {"pending": 2, "delivered": 1, "dead": 3}
    assert 299 <= stats["oldest_pending_age"] <= 310


def test_list_newest_first_with_state_reason_and_filters(
    store: Store, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = outbox(capsys, config, "list")
    assert ids(out) == ["ev-dead-b2", "ev-dead-b1", "ev-dead-a", "ev-delivered", "ev-retrying", "ev-queued"]
    lines = dict(zip(ids(out), out.splitlines(), strict=True))
    assert "  dead  attempts=1  403 Source Inactive" in lines["ev-dead-b2"]
    assert "  retrying  attempts=1  500 Internal Server Error" in lines["ev-retrying"]
    assert "  queued  attempts=0" in lines["ev-queued"] and "  cmp_a  signup  " in lines["ev-queued"]
    assert lines["ev-delivered"].endswith("delivered  attempts=1")
    assert ids(outbox(capsys, config, "list", "--state", "dead")[1]) == [
        "ev-dead-b2",
        "ev-dead-b1",
        "ev-dead-a",
    ]
    assert ids(outbox(capsys, config, "list", "--cid", "cmp_a", "--limit", "2")[1]) == [
        "ev-dead-a",
        "ev-delivered",
    ]
    assert outbox(capsys, config, "list", "--cid", "nobody")[1] == ""


def test_retry_needs_a_target(store: Store, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = outbox(capsys, config, "retry")
    assert code == 1 and "--all" in err
    assert store.stats().counts["dead"] == 3


def test_retry_by_id_by_campaign_and_all(
    store: Store, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert outbox(capsys, config, "retry", "ev-dead-a", "ev-delivered")[1] == "re-queued 1 dead letters\n"
    record = store.get("ev-dead-a")
    assert record is not None and record.state == "pending" and record.next_at <= time.time()
    assert outbox(capsys, config, "retry", "--cid", "cmp_b")[1] == "re-queued 2 dead letters\n"
    assert outbox(capsys, config, "retry", "--all")[1] == "re-queued 0 dead letters\n"
    assert store.stats().counts == {"pending": 5, "delivered": 1, "dead": 0}


def test_purge(store: Store, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert outbox(capsys, config, "purge", "--older-than-hours", "1")[1] == (
        "purged 0 delivered events (last updated more than 1h ago)\n"
    )
    assert outbox(capsys, config, "purge", "--all")[1] == "purged 1 delivered events (all of them)\n"
    assert (
        outbox(capsys, config, "purge", "--state", "dead", "--all")[1]
        == "purged 3 dead events (all of them)\n"
    )
    assert store.stats().counts == {"pending": 2, "delivered": 0, "dead": 0}
    assert store.get("ev-queued") is not None and store.get("ev-delivered") is None


def test_purge_refuses_pending(store: Store, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = outbox(capsys, config, "purge", "--state", "pending")
    assert code == 1 and "only delivered or dead" in err
    assert store.stats().counts["pending"] == 2


def test_the_installed_command_line(store: Store, config: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "outbox", "stats", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["dead"] == 3


def test_a_bad_config_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[relay]\nupstream_url = "http://127.0.0.1:1"\nstore = "mysql://x"\n')
    with pytest.raises(SystemExit) as exc:
        main(["outbox", "stats", "--config", str(bad)])
    assert "relay.store" in str(exc.value)
