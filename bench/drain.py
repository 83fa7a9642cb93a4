"""Drain: how fast a relay delivers a backlog (events stored while Pingtree was away) to the sandbox.

The backlog is written straight into the store through the :class:`~server.outbox.Store` API, with
records built by the relay's own validation and enrichment (the same payloads the accept path
stores). Then a relay starts against a fresh sandbox and the clock runs until the sandbox has
accepted every event; the store must then show nothing pending.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from server.config import load_config
from server.enrichment import dedupe_key, forward_body
from server.outbox import Record, Store, open_store
from server.validation import validate_event

from . import servers


@dataclass(frozen=True)
class DrainResult:
    store: str
    events: int
    fill_seconds: float
    seconds: float  # relay start -> sandbox has every event
    delivered: int
    pending_after: int
    peak_rss_mb: list[float]  # VmHWM of each relay worker at the end

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
        event = validate_event(campaign, {
            "event_id": "quote_viewed", "transaction_id": f"t{ident}", "event_uuid": f"u{ident}",
            "pid": "src_bench", "sub1": "ad42", "utm_source": "google", "utm_campaign": "spring",
        })
        received_at = time.time()
        records.append(Record(
            id=f"u{ident}", cid=campaign.cid, event_id=event.event_id, transaction_id=event.transaction_id,
            payload=forward_body(campaign, event, received_at=received_at, ip_address="203.0.113.7",
                                 user_agent="Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36"),
            received_at=received_at, dedupe_key=dedupe_key(event),
        ))
    return records


def fill(store_url: str, records: list[Record], threads: int = 4) -> float:
    """Add ``records`` through ``Store.add`` from a few threads (each opens its own connection); seconds."""
    store = open_store(store_url)
    chunks = [records[i::threads] for i in range(threads)]
    start = time.perf_counter()

    def add_all(chunk: list[Record]) -> None:
        for record in chunk:
            store.add(record, owner=None, lease=0)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(add_all, chunks))
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed


def _pending(store: Store) -> int:
    return store.stats().counts.get("pending", 0)


def run(workdir: Path, store_url: str, label: str, count: int, limit_seconds: float = 180.0) -> DrainResult:
    """Fill ``count`` events into ``store_url``, start a relay and time the drain (at most ``limit_seconds``)."""
    with servers.sandbox(workdir) as sandbox:
        relay = servers.relay(workdir, sandbox.url, store_url, name=f"drain-{label}")
        cfg = workdir / f"drain-{label}.toml"
        fill_seconds = fill(store_url, make_records(cfg, count))
        peaks: dict[int, float] = {}
        sampling = threading.Event()
        start = time.perf_counter()
        with relay:
            sampler = threading.Thread(target=_sample_rss, args=(relay, peaks, sampling), daemon=True)
            sampler.start()
            delivered = _wait_for(sandbox.url, count, start + limit_seconds)
            seconds = time.perf_counter() - start
            sampling.set()
            sampler.join()
            store = open_store(store_url)
            pending = _pending(store)
            store.close()
    return DrainResult(store=label, events=count, fill_seconds=round(fill_seconds, 1), seconds=round(seconds, 2),
                       delivered=delivered, pending_after=pending, peak_rss_mb=[round(v, 1) for v in peaks.values()])


def _wait_for(sandbox_url: str, count: int, deadline: float) -> int:
    accepted = 0
    while time.perf_counter() < deadline:
        accepted = httpx.get(sandbox_url + "/_sandbox/stats", timeout=10).json()["accepted"]
        if accepted >= count:
            break
        time.sleep(0.2)
    return accepted


def _sample_rss(relay: servers.Server, peaks: dict[int, float], stop: threading.Event) -> None:
    """Keep the last VmHWM seen per worker (read before the worker exits at shutdown)."""
    while not stop.wait(0.5):
        for pid in relay.worker_pids():
            peaks[pid] = max(peaks.get(pid, 0.0), servers.peak_rss_mb(pid))
