"""Drain: how fast a relay delivers a backlog (events stored while Pingtree was away).

The backlog is written straight into the store through the :class:`~server.outbox.Store` API, with
records built by the relay's own validation and enrichment (the same payloads the accept path
stores). Then a relay starts against a fresh upstream and the clock runs until the upstream has
every event: the fast sandbox (which checks every rule), or the lean fake Pingtree answering 300 ms
after each request (:mod:`bench.fake_upstream`). The store must then show nothing pending.
"""

from __future__ import annotations

import multiprocessing
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from server.config import load_config
from server.enrichment import dedupe_key, forward_body
from server.outbox import Record, Store, open_store
from server.validation import validate_event

from . import servers

UPSTREAMS = {"sandbox": "the fast sandbox", "300ms": "a 300 ms upstream"}


@dataclass(frozen=True)
class DrainResult:
    store: str
    events: int
    fill_seconds: float
    seconds: float  # relay start -> upstream has every event (or the cap)
    delivered: int
    pending_after: int
    peak_rss_mb: list[float]  # VmHWM of each relay worker at the end
    upstream: str = "sandbox"  # a key of UPSTREAMS
    peak_in_flight: int | None = None  # seen by the fake upstream (the sandbox does not count it)
    repeats: int | None = None

    @property
    def rps(self) -> float:
        return round(self.delivered / self.seconds, 1) if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps}


def make_records(config_path: Path, count: int) -> list[Record]:
    """``count`` quote_viewed events as the accept path would have stored them, unique transaction ids."""
    config = load_config(config_path)
    campaign = config.campaigns[servers.CID]
    prefix = secrets.token_hex(4)
    records = []
    for i in range(count):
        ident = f"{prefix}d{i}"
        event = validate_event(
            campaign,
            {
                "event_id": "quote_viewed",
                "transaction_id": f"t{ident}",
                "event_uuid": f"u{ident}",
                "pid": "src_bench",
                "sub1": "ad42",
                "utm_source": "google",
                "utm_campaign": "spring",
            },
        )
        received_at = time.time()
        records.append(
            Record(
                id=f"u{ident}",
                cid=campaign.cid,
                event_id=event.event_id,
                transaction_id=event.transaction_id,
                payload=forward_body(
                    campaign,
                    event,
                    received_at=received_at,
                    ip_address="203.0.113.7",
                    user_agent="Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36",
                ),
                received_at=received_at,
                dedupe_key=dedupe_key(event),
            )
        )
    return records


def fill(store_url: str, records: list[Record], processes: int = 4) -> float:
    """Add ``records`` through ``Store.add`` from a few processes (each opens its own store); seconds.

    Processes, not threads: ``Store.add`` is mostly Python (one Redis script call, or one SQLite
    transaction, per event), so threads of one process would share one core's worth of GIL.
    """
    ctx = multiprocessing.get_context("fork")  # the children inherit ``records`` instead of pickling them
    start = time.perf_counter()
    children = [
        ctx.Process(target=_add_all, args=(store_url, records[i::processes])) for i in range(processes)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join()
    failed = [c.exitcode for c in children if c.exitcode != 0]
    if failed:
        raise RuntimeError(f"filling {store_url} failed in {len(failed)} of {processes} processes")
    return time.perf_counter() - start


def _add_all(store_url: str, chunk: list[Record]) -> None:
    store = open_store(store_url)
    for record in chunk:
        store.add(record, owner=None, lease=0)
    store.close()


def _pending(store: Store) -> int:
    return store.stats().counts.get("pending", 0)


def fill_template(workdir: Path, records: list[Record]) -> tuple[Path, float]:
    """Fill a SQLite store once (``Store.add``); each SQLite drain starts from a copy of it."""
    path = workdir / "drain-template.sqlite3"
    seconds = fill(f"sqlite:///{path}", records)
    return path, seconds


def copy_sqlite(template: Path, target: Path) -> str:
    """A copy of a closed SQLite store (its WAL was checkpointed when the last connection closed)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def fill_redis_template(workdir: Path, records: list[Record]) -> dict[str, Any]:
    """Fill a throwaway redis-server once and stop it: its AOF directory is the template each
    Redis drain starts from (a copy), since filling through ``Store.add`` is the slow part."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not installed")
    data = workdir / "redis-template"
    with servers.redis_server(workdir, data) as redis:
        seconds = fill(f"redis://127.0.0.1:{redis.port}/0", records)
    # SIGTERM made redis-server flush its AOF before exiting (Server.stop waits for that).
    return {"data": str(data), "seconds": seconds}


def copy_redis(template: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(template, target)
    return target


def run(
    workdir: Path,
    store_url: str,
    label: str,
    records: list[Record],
    *,
    upstream: str = "sandbox",
    limit_seconds: float = 180.0,
    fill_seconds: float | None = None,
) -> DrainResult:
    """Time a fresh relay draining ``records`` from ``store_url`` to ``upstream`` (at most ``limit_seconds``).

    The store is filled here unless ``fill_seconds`` says it already was (a copy of a template).
    """
    count = len(records)
    name = f"drain-{label.lower()}-{upstream}"
    upstream_server = (
        servers.sandbox(workdir)
        if upstream == "sandbox"
        else servers.fake_upstream(workdir, 300, name=f"{name}-upstream")
    )
    with upstream_server:
        relay = servers.relay(workdir, upstream_server.url, store_url, name=name)
        if fill_seconds is None:
            fill_seconds = fill(store_url, records)
        peaks: dict[int, float] = {}
        sampling = threading.Event()
        start = time.perf_counter()
        with relay:
            sampler = threading.Thread(target=_sample_rss, args=(relay, peaks, sampling), daemon=True)
            sampler.start()
            delivered, stats = _wait_for(upstream_server, upstream, count, start + limit_seconds)
            seconds = time.perf_counter() - start
            sampling.set()
            sampler.join()
            store = open_store(store_url)
            pending = _pending(store)
            store.close()
    return DrainResult(
        store=label,
        events=count,
        fill_seconds=round(fill_seconds, 1),
        seconds=round(seconds, 2),
        delivered=delivered,
        pending_after=pending,
        peak_rss_mb=[round(v, 1) for v in peaks.values()],
        upstream=upstream,
        peak_in_flight=stats.get("peak_in_flight"),
        repeats=stats.get("repeats"),
    )


def _wait_for(upstream: servers.Server, kind: str, count: int, deadline: float) -> tuple[int, dict[str, Any]]:
    """Distinct events the upstream has, once it has ``count`` or at the deadline; and its stats."""
    while True:
        if kind == "sandbox":
            stats = httpx.get(upstream.url + "/_sandbox/stats", timeout=10).json()
            delivered = stats["accepted"]
            stats = {}
        else:
            stats = servers.upstream_stats(upstream)
            delivered = stats["unique"]
        if delivered >= count or time.perf_counter() >= deadline:
            return delivered, stats
        time.sleep(0.2)


def _sample_rss(relay: servers.Server, peaks: dict[int, float], stop: threading.Event) -> None:
    """Keep the last VmHWM seen per worker (read before the worker exits at shutdown)."""
    while not stop.wait(0.5):
        for pid in relay.worker_pids():
            peaks[pid] = max(peaks.get(pid, 0.0), servers.peak_rss_mb(pid))
