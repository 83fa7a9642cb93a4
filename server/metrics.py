"""``GET /metrics``: Prometheus text format, fed by the observer bus.

Under gunicorn each worker is its own process with its own counters. When
``PROMETHEUS_MULTIPROC_DIR`` is set (``pingtree-relay serve`` sets it, see :mod:`server.wsgi`)
prometheus-client keeps every value in a per-process file there and a scrape, whichever worker
answers it, adds them all up. Without it (tests, the one-process demo) the app keeps its own
registry. Queue depth and the oldest pending age are not counted at all: they are read from the
shared store at scrape time, so every worker reports the same truth.

Label values come only from the configuration (campaign ids, event ids) or from short reason
labels written in the code, never from request input: a client posting random event ids must not
be able to grow the number of time series. SDK versions are content hashes the relay built itself
(never the one a request names), at most ``MAX_SDK_VERSIONS`` per campaign per process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .build import store_kind, version
from .config import Config
from .outbox.sqlite import SQLiteStore
from .relay import Relay, relay_of

UNKNOWN = "unknown"
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REASON = re.compile(r"^[a-z0-9_]{1,40}$")
MAX_SDK_VERSIONS = 8
SDK_STATES = ("stable", "current", "superseded", "unknown")


_CE = ("cid", "event_id")
# Every counter family: name (after ``pingtree_relay_``) -> (help text, label names). One table, so
# a new family is one line and cannot differ in how it is registered.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "events_received": ("Event requests received, by campaign", ("cid",)),
    "events_accepted": ("Events accepted, by outcome of the answer", (*_CE, "outcome")),
    "events_rejected": ("Event requests refused, by reason", (*_CE, "reason")),
    "events_filtered": ("Events accepted but not forwarded (bots)", (*_CE, "reason")),
    "events_delivered": ("Events Pingtree accepted", _CE),
    "events_dead": ("Events given up on (dead letters)", _CE),
    "delivery_retries": ("Delivery attempts that will be retried", _CE),
    "postbacks": (
        "Postback requests, by source and outcome (refused, or the outcome of an accepted one)",
        ("cid", "source", "outcome"),
    ),
    "postbacks_refused": ("Postbacks refused, by source and reason", ("cid", "source", "reason")),
    # Test traffic (staging origins) is counted apart: it must not inflate what reached Pingtree.
    "test_events": ("Test events (staging origins), by outcome; never sent to Pingtree", (*_CE, "outcome")),
    "sdk_requests": (
        "SDK script requests by campaign, build version and its state "
        "(stable URL, pinned current, pinned superseded, pinned unknown or expired)",
        ("cid", "version", "state"),
    ),
    # A SQLite outbox only: writes that found another process holding the file's write lock.
    "sqlite_lock_waits": ("SQLite writes that waited for another process's write lock", ("operation",)),
    "sqlite_lock_wait_seconds": ("Time SQLite writes spent waiting for that lock", ("operation",)),
}
# What waited (server/outbox/sqlite.py): insert is the accept path, claim and settle the delivery engine.
LOCK_WAIT_OPERATIONS = ("insert", "claim", "settle", "other")


MAX_CACHED_SERIES = 10_000


class Metrics:
    """The relay's counters and histogram, and the observer that moves them."""

    def __init__(self, config: Config, registry: CollectorRegistry | None) -> None:
        self.config = config
        self.registry = registry  # None: multiprocess, the values live in PROMETHEUS_MULTIPROC_DIR
        self.counters: dict[str, Counter] = {
            name: Counter(f"pingtree_relay_{name}", documentation, labels, registry=registry)
            for name, (documentation, labels) in COUNTERS.items()
        }
        self.latency = Histogram(
            "pingtree_relay_upstream_latency_seconds",
            "Time Pingtree took to answer",
            ["state"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._sdk_versions: dict[str, set[str]] = {}
        self._sdk_children: dict[tuple[str, str, str], Any] = {}  # labels() is costly on the script path
        self._children: dict[tuple[Any, ...], Any] = {}  # (metric, *labels) -> its child
        self._zeroes()

    def _zeroes(self) -> None:
        # Every configured (campaign, event) shows up at 0 from the start: a rate() over a series
        # that appears only with its first event misses that first event.
        for cid, campaign in self.config.campaigns.items():
            self.counters["events_received"].labels(cid)
            # sdk_requests of an unknown build: alert on any increase, a broken tag.
            self.counters["sdk_requests"].labels(cid, UNKNOWN, "unknown")
            for event_id in campaign.events:
                self.counters["events_delivered"].labels(cid, event_id)
                self.counters["events_dead"].labels(cid, event_id)
            for source in campaign.postbacks:
                self.counters["postbacks"].labels(cid, source, "refused")

    def watch_lock_waits(self, store: SQLiteStore) -> None:
        """Count ``store``'s lock waits, every operation at 0 from the start like the event counters."""
        store.lock_wait_observer = self.lock_waited
        for operation in LOCK_WAIT_OPERATIONS:
            self.counters["sqlite_lock_waits"].labels(operation)
            self.counters["sqlite_lock_wait_seconds"].labels(operation)

    def lock_waited(self, operation: str, seconds: float) -> None:
        """The SQLite store's :attr:`~server.outbox.sqlite.SQLiteStore.lock_wait_observer`."""
        label = operation if operation in LOCK_WAIT_OPERATIONS else "other"
        self._inc("sqlite_lock_waits", label)
        self._child(self.counters["sqlite_lock_wait_seconds"], label).inc(seconds)

    def labels(self, fields: dict[str, Any]) -> tuple[str, str]:
        """(cid, event_id) as label values: configured ones, else ``unknown``."""
        campaign = self.config.campaigns.get(fields.get("cid") or "")
        if campaign is None:
            return UNKNOWN, UNKNOWN
        event_id = fields.get("event_id")
        if isinstance(event_id, str) and event_id in campaign.events:
            return campaign.cid, event_id
        return campaign.cid, UNKNOWN

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: labels() validates and locks on every call, and two or
        three run per event."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < MAX_CACHED_SERIES:  # labels are bounded by the config; still
                self._children[key] = child
        return child

    def _inc(self, family: str, *labels: str) -> None:
        self._child(self.counters[family], *labels).inc()

    def observe(self, kind: str, fields: dict[str, Any]) -> None:
        """Observer for :class:`server.observe.Observers`."""
        cid, event_id = self.labels(fields)
        if kind == "received":
            self._inc("events_received", cid)
        elif fields.get("test"):
            # Neither accepted nor delivered to Pingtree: counted once, apart, when answered.
            if kind == "accepted":
                self._inc("test_events", cid, event_id, _label(fields.get("outcome")))
        elif kind == "accepted" and fields.get("outcome") == "duplicate":
            # Answered 400 "Duplicate event" (the lead already had it): a refusal, not an acceptance.
            self._inc("events_rejected", cid, event_id, "duplicate")
        elif kind == "accepted":
            self._inc("events_accepted", cid, event_id, _label(fields.get("outcome")))
        elif kind == "rejected":
            self._inc("events_rejected", cid, event_id, _label(fields.get("reason")))
        elif kind == "filtered":
            self._inc("events_filtered", cid, event_id, _label(fields.get("reason")))
        elif kind == "delivery":
            self._delivery(cid, event_id, fields)
        elif kind == "postback":
            self._postback(cid, fields)
        elif kind == "sdk":
            self._sdk(cid, fields)

    def _postback(self, cid: str, fields: dict[str, Any]) -> None:
        campaign = self.config.campaigns.get(cid)
        given = fields.get("source")
        source = UNKNOWN
        if campaign is not None and isinstance(given, str) and given in campaign.postbacks:
            source = given  # only a configured source becomes a label, like campaign and event ids
        outcome = _label(fields.get("outcome"))
        self._inc("postbacks", cid, source, outcome)
        if outcome == "refused":
            self._inc("postbacks_refused", cid, source, _label(fields.get("reason")))

    def _sdk(self, cid: str, fields: dict[str, Any]) -> None:
        child = self._sdk_children.get((cid, fields.get("version"), fields.get("state")))  # type: ignore[arg-type]
        if child is not None:
            child.inc()
            return
        state = fields.get("state")
        state = state if state in SDK_STATES else "unknown"
        version = fields.get("version")
        version = version if isinstance(version, str) and _REASON.match(version) else UNKNOWN
        seen = self._sdk_versions.setdefault(cid, set())
        if version not in seen:
            if len(seen) >= MAX_SDK_VERSIONS:
                version = "other"  # a long-lived process through many config changes
            else:
                seen.add(version)
        child = self.counters["sdk_requests"].labels(cid, version, state)
        if version != "other":  # an "other" version stays uncached: it must keep folding
            self._sdk_children[(cid, fields["version"], fields["state"])] = child
        child.inc()

    def _delivery(self, cid: str, event_id: str, fields: dict[str, Any]) -> None:
        state = str(fields.get("state"))
        family = {"delivered": "events_delivered", "dead": "events_dead"}.get(state, "delivery_retries")
        self._inc(family, cid, event_id)
        latency_ms = fields.get("latency_ms")
        if fields.get("status") is not None and isinstance(latency_ms, (int, float)):
            # Only attempts Pingtree answered: a connection refused in 1 ms is not a latency.
            self._child(self.latency, _label(state)).observe(latency_ms / 1000.0)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """``(labels, value)`` of every series of counter ``name`` (without ``_total``), summed over
        workers the way a scrape is: what the dashboard shows agrees with /metrics."""
        registry = self.registry
        if registry is None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return [
            (dict(sample.labels), sample.value)
            for family in registry.collect()
            if family.name == name
            for sample in family.samples
            if sample.name == name + "_total"
        ]


def _label(value: Any) -> str:
    """Reason and outcome labels are code-defined; anything odd is folded into ``other``."""
    return value if isinstance(value, str) and _REASON.match(value) else "other"


class BuildInfoCollector(Collector):
    """``pingtree_relay_build_info{version, store} 1``: which release runs, on which kind of store.

    A constant, so it is produced at scrape time (never written to the multiprocess files, where a
    gauge of every worker would add up to the number of workers)."""

    def __init__(self, store_url: str) -> None:
        self.labels = {"version": version(), "store": store_kind(store_url)}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "pingtree_relay_build_info", "The running release and the kind of store", labels=list(self.labels)
        )
        info.add_metric(list(self.labels.values()), 1)
        yield info


class QueueCollector(Collector):
    """Gauges read from the shared store at scrape time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.relay.store.stats()
        depth = GaugeMetricFamily("pingtree_relay_queue_depth", "Events waiting for delivery (pending)")
        depth.add_metric([], stats.counts.get("pending", 0))
        yield depth
        age = GaugeMetricFamily(
            "pingtree_relay_queue_oldest_pending_age_seconds",
            "Age of the oldest event waiting for delivery; 0 when none",
        )
        age.add_metric([], stats.oldest_pending_age)
        yield age
        stored = GaugeMetricFamily(
            "pingtree_relay_outbox_events", "Events in the outbox by state", labels=["state"]
        )
        for state, count in sorted(stats.counts.items()):
            stored.add_metric([state], count)
        yield stored
        journal = self.relay.store.journal_bytes()
        if journal is not None:
            wal = GaugeMetricFamily(
                "pingtree_relay_sqlite_wal_bytes",
                "Size of the SQLite outbox's WAL file (the delivery engine's checkpoints keep it small)",
            )
            wal.add_metric([], journal)
            yield wal


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process runs under ``serve`` (several workers)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def init_app(app: Flask) -> None:
    """Count decisions from the observer bus and serve ``GET /metrics``."""
    relay = relay_of(app)
    # The *_created series double the output and no dashboard of ours reads them.
    disable_created_metrics()
    shared = multiprocess_dir() is not None
    # Multiprocess: values live in files and the scrape builds a fresh registry. Single process:
    # one registry per app, so two apps in one process (tests) never collide on metric names.
    own = None if shared else CollectorRegistry()
    metrics = Metrics(relay.config, own)
    relay.observers.add(metrics.observe)
    if isinstance(relay.store, SQLiteStore):  # the only store with a lock to wait for
        metrics.watch_lock_waits(relay.store)
    app.extensions["metrics"] = metrics
    queue = QueueCollector(relay)
    build = BuildInfoCollector(relay.config.relay.store)
    if own is not None:
        own.register(queue)
        own.register(build)

    def scrape() -> Response:
        registry = own
        if registry is None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(queue)
            registry.register(build)
        return Response(
            generate_latest(registry), content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"}
        )

    app.add_url_rule("/metrics", "metrics", scrape, methods=["GET"])
