"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import threading
import time

from flask import Blueprint, Flask, Response, current_app, jsonify

from .outbox import Store
from .relay import current_relay, relay_of
from .upstream_state import Outcome, latest
from .worker import CONNECTIONS

bp = Blueprint("health", __name__)

# A load balancer probes every few seconds, each worker answering some: one real write per worker
# per this many seconds at most, and a full disk still shows within it.
WRITE_PROBE_SECONDS = 2.0


class WriteProbe:
    """The store's last write probe, remembered for ``WRITE_PROBE_SECONDS`` (per process)."""

    def __init__(self, store: Store, ttl: float = WRITE_PROBE_SECONDS) -> None:
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -ttl
        self._error: str | None = None

    def error(self) -> str | None:
        """None when the store took a write within ``ttl`` seconds, else why not."""
        with self._lock:  # one probe at a time; the others wait and share its answer
            if time.monotonic() - self._at >= self.ttl:
                self._error = self.store.check_writable()
                self._at = time.monotonic()
            return self._error


def write_probe(app: Flask) -> WriteProbe:
    """The app's probe, made on first use (after the fork: the store is opened per worker)."""
    relay = relay_of(app)
    probe = app.extensions.get("write_probe")
    if probe is None or probe.store is not relay.store:
        probe = app.extensions["write_probe"] = WriteProbe(relay.store)
    return probe  # type: ignore[no-any-return]


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive and serving."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Ready when the store takes a write: with the store up the relay accepts events even if
    Pingtree is down (it queues them), so upstream trouble is reported but does not make it unready;
    a store that answers but refuses writes (full disk, Redis OOM) does make it unready."""
    relay = current_relay()
    store_ok = relay.store.ping()
    write_error = write_probe(current_app).error() if store_ok else None
    ready = store_ok and write_error is None
    stats = relay.store.stats() if store_ok else None
    body = {
        "status": "ok" if ready else "unavailable",
        "store": "ok" if ready else ("unwritable" if store_ok else "unreachable"),
        **({"store_error": write_error[:200]} if write_error else {}),
        "persistence": relay.store.persistence().to_dict() if store_ok else None,
        "upstream": _upstream(latest(relay.upstream_last(), relay.forwarder.upstream.read())),
        "queue": stats.to_dict() if stats else None,
        **_workers(),
    }
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    return response


def _workers() -> dict[str, object]:
    """Under ``serve``: how many gunicorn workers are up and how the open connections spread over
    them (server/worker.py's fair accept). Nothing outside gunicorn."""
    live = CONNECTIONS.live()
    return {"workers": {"live": len(live), "connections": live}} if live else {}


def _upstream(last: Outcome | None) -> dict[str, object]:
    """What the box's latest attempt upstream said (any worker's); "failing" still means events are queued."""
    if last is None:
        return {"state": "unknown", "detail": "no attempt yet"}
    at, answered, detail = last
    return {
        "state": "ok" if answered else "failing",
        "detail": detail,
        "age_seconds": round(max(0.0, time.time() - at), 1),
        **({} if answered else {"note": "events are queued and retried"}),
    }
