"""Durability figures: ``python -m bench.durability [--events N] [--store sqlite|redis|both] [--write-docs]``.

For each store, two faults while clients send events: the relay killed with SIGKILL (master and
workers, no cleanup) and restarted, and a store outage (SQLite: the disk fills up, then space is
freed; Redis: redis-server killed with SIGKILL and restarted on its AOF). Real processes on
127.0.0.1: ``pingtree-relay serve``, the sandbox playing Pingtree, redis-server.

Clients behave like the SDK: each event has its own ``event_uuid`` and is resent with it after a
network error, a 5xx or a 503 until the relay accepts it (or 60 s pass). Then the script waits for
the relay to deliver and counts, per scenario:

- sent: events the clients tried to send; accepted: answered 200/202 at some point;
- delivered: accepted events the sandbox recorded; lost: accepted but never recorded;
- doubled: events recorded twice (counted twice by "Pingtree"); resent: events whose request
  reached the sandbox more than once on the wire (Pingtree's duplicate check absorbed those).

Half the events are once-per-lead (``quote_viewed``), half Multi-Trigger (``call_clicked``,
``allow_duplicates``: Pingtree has no duplicate check for those, so a resend would count twice).
Bounded: a few hundred events and about a minute per scenario. Logs go to bench/results/durability/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from server.outbox.sqlite import MAX_PAGE_COUNT_ENV, SQLiteStore

from . import servers

ROOT = servers.ROOT
CID = "cmp_durable"
ORIGIN = "https://www.example.com"
CAMPAIGN = f"""
[campaigns.{CID}]
allowed_origins = ["{ORIGIN}"]
[campaigns.{CID}.events.quote_viewed]
[campaigns.{CID}.events.call_clicked]
allow_duplicates = true
"""
RESEND_FOR = 60.0  # seconds a client keeps resending one event, as the SDK keeps it queued
DRAIN_FOR = 90.0
MARKERS = ("<!-- durability-figures -->", "<!-- /durability-figures -->")


@dataclass
class Figures:
    store: str
    fault: str
    sent: int = 0
    accepted: int = 0
    delivered: int = 0
    lost: int = 0
    doubled: int = 0
    resent: int = 0
    client_retries: int = 0  # answers that were 503, 5xx or a broken connection, then resent


def write_config(path: Path, store: str) -> Path:
    relay = [
        "[relay]",
        'upstream_url = "{upstream}"',
        f'store = "{store}"',
        "upstream_timeout = 2",
        "lease_seconds = 5",
        "retry_base_seconds = 0.2",
        "retry_cap_seconds = 1.0",
        "[relay.rate_limits]",
        'per_ip = ""',
        'per_campaign = ""',
    ]
    path.write_text("\n".join(relay) + "\n" + CAMPAIGN)
    return path


class Clients:
    """Threads sending events like the SDK: same event_uuid on every resend until accepted."""

    def __init__(self, url: str, figures: Figures) -> None:
        self.url = url
        self.figures = figures
        self.accepted: list[str] = []
        self._lock = threading.Lock()

    def send(self, index: int) -> None:
        event_id = "quote_viewed" if index % 2 else "call_clicked"
        body = {
            "event_id": event_id,
            "transaction_id": f"dur-{index}-{uuid.uuid4().hex[:6]}",
            "event_uuid": uuid.uuid4().hex,
        }
        deadline = time.monotonic() + RESEND_FOR
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                try:
                    answer = client.post(f"{self.url}/api/event/{CID}", json=body, headers={"Origin": ORIGIN})
                    if answer.status_code in (200, 202):
                        with self._lock:
                            self.accepted.append(body["transaction_id"])
                        return
                    if answer.status_code < 500:
                        raise RuntimeError(f"refused: {answer.status_code} {answer.text}")
                except httpx.TransportError:
                    pass
                with self._lock:
                    self.figures.client_retries += 1
                time.sleep(0.2)


def run_scenario(workdir: Path, store_kind: str, fault: str, events: int) -> Figures:
    figures = Figures(store=store_kind, fault=fault, sent=events)
    shutil.rmtree(workdir, ignore_errors=True)  # a rerun starts from an empty store
    workdir.mkdir(parents=True)
    sandbox_cfg = workdir / "sandbox.toml"
    sandbox_cfg.write_text(
        '[relay]\nupstream_url = "http://127.0.0.1:1"\nstore = "sqlite:///unused"\n' + CAMPAIGN
    )
    sandbox = servers.Server(servers.cli("sandbox", "--config", str(sandbox_cfg)), workdir / "sandbox.log")
    redis = servers.redis_server(workdir) if store_kind == "redis" else None
    started: list[servers.Server] = [sandbox] + ([redis] if redis else [])
    try:
        sandbox.start()
        env: dict[str, str] = {}
        if redis:
            redis.start()
            store = f"redis://127.0.0.1:{redis.port}/0"
        else:
            path = workdir / "outbox.sqlite3"
            store = f"sqlite:///{path}"
            if fault == "store outage":
                env[MAX_PAGE_COUNT_ENV] = str(_ballast(path))
        cfg = write_config(workdir / "relay.toml", store)
        cfg.write_text(cfg.read_text().replace("{upstream}", sandbox.url))
        relay = servers.Server(servers.cli("serve", "--config", str(cfg)), workdir / "relay.log", env=env)
        started.append(relay)
        relay.start()
        clients = Clients(relay.url, figures)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(clients.send, i) for i in range(events)]
            if not (fault == "store outage" and store_kind == "sqlite"):  # that one fills up by itself
                _wait_until(lambda: len(clients.accepted) >= events // 3, 60)
            _inject(fault, relay, redis, workdir)
            for future in futures:
                future.result()
        figures.accepted = len(clients.accepted)
        _count(figures, sandbox, set(clients.accepted))
    finally:
        for server in reversed(started):
            server.stop()
    return figures


def _ballast(path: Path) -> int:
    """A store file with 1.6 MB of ballast to free later (room for every event after); returns a page
    limit ~32 KB above it, so the "disk" fills after about a hundred events."""
    SQLiteStore(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE ballast (b BLOB)")
        db.executemany("INSERT INTO ballast VALUES (zeroblob(4000))", [()] * 400)
        return int(db.execute("PRAGMA page_count").fetchone()[0]) + 8


def _inject(fault: str, relay: servers.Server, redis: servers.Server | None, workdir: Path) -> None:
    if fault == "relay kill -9":
        assert relay.proc is not None
        os.killpg(os.getpgid(relay.proc.pid), signal.SIGKILL)
        relay.proc.wait(10)
        time.sleep(1.0)
        relay.start()
    elif redis is not None:
        assert redis.proc is not None
        os.killpg(os.getpgid(redis.proc.pid), signal.SIGKILL)
        redis.proc.wait(10)
        time.sleep(3.0)
        redis.start()
    else:  # SQLite: the disk stays full for a few seconds, then the operator frees space
        _wait_until(lambda: _readyz(relay) == 503, 60)
        time.sleep(3.0)
        with sqlite3.connect(workdir / "outbox.sqlite3") as db:
            db.execute("DROP TABLE ballast")


def _readyz(relay: servers.Server) -> int:
    try:
        return httpx.get(relay.url + "/readyz", timeout=5).status_code
    except httpx.TransportError:
        return 0


def _count(figures: Figures, sandbox: servers.Server, accepted: set[str]) -> None:
    def recorded() -> Counter[str]:
        events = httpx.get(sandbox.url + "/_sandbox/events", timeout=10).json()["events"]
        return Counter(e["transaction_id"] for e in events)

    _wait_until(lambda: accepted <= set(recorded()), DRAIN_FOR)
    counts = recorded()
    figures.delivered = len(accepted & set(counts))
    figures.lost = len(accepted - set(counts))
    figures.doubled = sum(1 for n in counts.values() if n > 1)
    wire: Counter[str] = Counter()
    for request in httpx.get(sandbox.url + "/_sandbox/requests", timeout=10).json()["requests"]:
        body = request.get("body")
        if isinstance(body, dict) and isinstance(body.get("transaction_id"), str):
            wire[body["transaction_id"]] += 1
    figures.resent = sum(1 for n in wire.values() if n > 1)


def _wait_until(predicate: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)


def markdown(results: list[Figures], events: int) -> str:
    lines = [
        f"Measured by `python -m bench.durability --events {events}` on {time.strftime('%Y-%m-%d')} "
        f"({os.cpu_count()} cores).",
        "",
        "| store | fault | sent | accepted | delivered | lost | doubled | resent on the wire | client resends |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in results:
        lines.append(
            f"| {f.store} | {f.fault} | {f.sent} | {f.accepted} | {f.delivered} | {f.lost} | "
            f"{f.doubled} | {f.resent} | {f.client_retries} |"
        )
    return "\n".join(lines)


def write_docs(table: str) -> None:
    path = ROOT / "docs" / "durability.md"
    text = path.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    path.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--store", choices=("sqlite", "redis", "both"), default="both")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/durability.md")
    args = parser.parse_args(argv)
    results_dir = ROOT / "bench" / "results" / "durability"
    stores = ("sqlite", "redis") if args.store == "both" else (args.store,)
    results = []
    for store in stores:
        for fault in ("relay kill -9", "store outage"):
            print(f"[durability] {store}: {fault} ...", flush=True)
            workdir = results_dir / f"{store}-{fault.replace(' ', '-')}"
            results.append(run_scenario(workdir, store, fault, args.events))
            print(f"[durability] {json.dumps(asdict(results[-1]))}", flush=True)
    table = markdown(results, args.events)
    print(table)
    if args.write_docs:
        write_docs(table)
    return 1 if any(f.lost for f in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
