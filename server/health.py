"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify

from .upstream_state import Outcome, latest

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive and serving."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Ready when the store answers: with the store up the relay accepts events even if Pingtree
    is down (it queues them), so upstream trouble is reported but does not make it unready."""
    relay = current_app.extensions["relay"]
    store_ok = relay.store.ping()
    stats = relay.store.stats() if store_ok else None
    body = {
        "status": "ok" if store_ok else "unavailable",
        "store": "ok" if store_ok else "unreachable",
        "upstream": _upstream(latest(relay.upstream_last(), relay.forwarder.upstream.read())),
        "queue": stats.to_dict() if stats else None,
    }
    response = jsonify(body)
    response.status_code = 200 if store_ok else 503
    return response


def _upstream(last: Outcome | None) -> dict[str, object]:
    """What the box's latest attempt upstream said (any worker's); "failing" still means events are queued."""
    if last is None:
        return {"state": "unknown", "detail": "no attempt yet"}
    at, answered, detail = last
    return {"state": "ok" if answered else "failing", "detail": detail,
            "age_seconds": round(max(0.0, time.time() - at), 1),
            **({} if answered else {"note": "events are queued and retried"})}
