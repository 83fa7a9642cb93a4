"""Sustained delivery: ~1,000 events/s offered for 15 s or more to a relay whose upstream answers
each event ``latency_ms`` after receiving it; does delivery keep up, or does a backlog grow?

The upstream is the lean fake Pingtree (:mod:`bench.fake_upstream`), so that what limits delivery
is the relay. Offered load is open loop (wrk paced on a clock: :func:`bench.load.run_paced`), so a
relay that answers slowly still gets the full rate. Measured from the outside only: the upstream
counts distinct events and its answers in flight; the store says how many events were accepted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.outbox import open_store

from . import load, servers

PATH = f"/api/event/{servers.CID}"


@dataclass(frozen=True)
class SustainedResult:
    latency_ms: float
    store: str
    offered_rate: float  # the paced rate asked of wrk
    seconds: float  # load duration
    sent: int  # event requests wrk had answered by the end of the load
    accepted: int  # events in the store after the load (200 forwarded + 202 stored)
    answer_errors: int  # wrk: non-2xx answers and socket errors
    delivered_during_load: int  # distinct events the upstream had received when the load stopped
    backlog_mid: int  # events pending in the store half-way through the load
    backlog_end: int  # events pending in the store when the load stopped
    empty_seconds: float | None  # load end -> upstream has every accepted event; None: not within the cap
    empty_cap: float
    delivered_total: int
    repeats: int  # events the upstream received more than once
    peak_in_flight: int  # most answers the upstream held at once
    p50_ms: float
    p99_ms: float
    wrk_cpu_percent: float
    relay_cpu_percent: float  # relay processes' CPU over the load, as a share of one core
    upstream_cpu_percent: float
    peak_rss_mb: list[float] = field(default_factory=list)  # VmHWM per relay process

    @property
    def accepted_rate(self) -> float:
        return round(self.accepted / self.seconds, 1) if self.seconds else 0.0

    @property
    def delivered_rate(self) -> float:
        """Distinct events delivered per second while the load ran."""
        return round(self.delivered_during_load / self.seconds, 1) if self.seconds else 0.0

    @property
    def backlog_growth(self) -> float:
        """Events/s the backlog grew by over the second half of the load (about 0: flat)."""
        return round((self.backlog_end - self.backlog_mid) / (self.seconds / 2), 1) if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "accepted_rate": self.accepted_rate,
            "delivered_rate": self.delivered_rate,
            "backlog_growth": self.backlog_growth,
        }


# wrk's pacing starts and stops: its run lasts a few tens of ms longer than the load it paces, so a
# relay that took in and delivered every event shows 999.4 "of 1,000" (15,011 events in 15.02 s).
PACING_SLACK = 0.01


def delivery_target(row: dict[str, Any], rate: float) -> float:
    """What a sustained run's delivered ev/s is held to: ``rate``, or the rate the relay actually
    took events in when that is within ``PACING_SLACK`` of it (all of it delivered is all there was
    to deliver). An accept side further behind than that leaves the target at ``rate``: a relay
    that takes in less is not let off delivering less."""
    accepted = row.get("accepted_rate")
    if accepted is not None and rate * (1 - PACING_SLACK) <= accepted < rate:
        return accepted
    return rate


def nearest(samples: list[tuple[float, int]], t: float) -> int:
    """The sampled value at the time nearest ``t`` (0 without samples)."""
    return min(samples, key=lambda s: abs(s[0] - t))[1] if samples else 0


def run(
    workdir: Path,
    store_url: str,
    store_label: str,
    latency_ms: float,
    *,
    rate: float = 1000,
    seconds: float = 15,
    empty_cap: float = 45,
    during_load: Callable[[servers.Server], None] | None = None,
) -> SustainedResult:
    """One sustained run on a fresh store, relay and upstream; ``during_load(relay)`` runs in a thread
    from the start of the load (a profiler), and is waited for before the relay stops."""
    name = f"sustained-{store_label.lower()}-{latency_ms:g}ms"
    with (
        servers.fake_upstream(workdir, latency_ms, name=f"{name}-upstream") as upstream,
        servers.relay(workdir, upstream.url, store_url, name=name) as relay,
    ):
        # Connections for the worst case: every request waiting a full inline attempt upstream.
        connections = int(max(100, min(1000, rate * (latency_ms / 1000 + 0.2))))
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        started = time.monotonic()
        sampler = threading.Thread(
            target=_sample_backlog, args=(store_url, started, samples, stop), daemon=True
        )
        cpu = (servers.cpu_seconds(relay), servers.cpu_seconds(upstream))
        sampler.start()
        side = threading.Thread(target=during_load, args=(relay,), daemon=True) if during_load else None
        if side is not None:
            side.start()
        result = load.run_paced(
            relay.url, PATH, rate=rate, seconds=seconds, origin=servers.ORIGIN, connections=connections
        )
        relay_cpu = servers.cpu_seconds(relay) - cpu[0]
        upstream_cpu = servers.cpu_seconds(upstream) - cpu[1]
        at_end = servers.upstream_stats(upstream)
        backlog_end = _pending(store_url)
        stop.set()
        sampler.join()
        accepted = _accepted(store_url)
        empty_seconds, final = _wait_empty(upstream, accepted, empty_cap)
        if side is not None:
            side.join()
        rss = [round(servers.peak_rss_mb(pid), 1) for pid in relay.worker_pids()]
    return SustainedResult(
        latency_ms=latency_ms,
        store=store_label,
        offered_rate=rate,
        seconds=result.seconds,
        sent=result.requests,
        accepted=accepted,
        answer_errors=result.errors,
        delivered_during_load=at_end["unique"],
        backlog_mid=nearest(samples, result.seconds / 2),
        backlog_end=backlog_end,
        empty_seconds=empty_seconds,
        empty_cap=empty_cap,
        delivered_total=final["unique"],
        repeats=final["repeats"],
        peak_in_flight=final["peak_in_flight"],
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        wrk_cpu_percent=result.wrk_cpu_percent,
        relay_cpu_percent=round(100 * relay_cpu / result.seconds, 1),
        upstream_cpu_percent=round(100 * upstream_cpu / result.seconds, 1),
        peak_rss_mb=rss,
    )


def _sample_backlog(
    store_url: str, started: float, samples: list[tuple[float, int]], stop: threading.Event
) -> None:
    while not stop.wait(1.0):
        samples.append((time.monotonic() - started, _pending(store_url)))


def _counts(store_url: str) -> dict[str, int]:
    store = open_store(store_url)
    try:
        return dict(store.stats().counts)
    finally:
        store.close()


def _pending(store_url: str) -> int:
    return _counts(store_url).get("pending", 0)


def _accepted(store_url: str) -> int:
    """Every event the store holds, whatever its state: what the relay accepted."""
    return sum(_counts(store_url).values())


def _wait_empty(upstream: servers.Server, accepted: int, cap: float) -> tuple[float | None, dict[str, Any]]:
    """Seconds until the upstream has received ``accepted`` distinct events (None past ``cap``)."""
    started = time.monotonic()
    while True:
        stats = servers.upstream_stats(upstream)
        elapsed = time.monotonic() - started
        if stats["unique"] >= accepted:
            return round(elapsed, 1), stats
        if elapsed >= cap:
            return None, stats
        time.sleep(0.2)


def median_trial(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of several runs (:meth:`SustainedResult.to_dict`, or ``{"error": ...}``) by
    distinct events delivered, with every measured run's delivered events/s as ``trials``, in the
    order they ran; the first run (an error) when none was measured."""
    measured = [r for r in runs if "error" not in r]
    if not measured:
        return dict(runs[0])
    ranked = sorted(measured, key=lambda r: r["delivered_during_load"])
    row = dict(ranked[len(ranked) // 2])
    row["trials"] = [round(r["delivered_during_load"] / r["seconds"], 1) for r in measured]
    return row
