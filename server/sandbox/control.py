"""The control API under ``/_sandbox/``: what tests and the demo use to inspect and steer the sandbox.

Plain JSON (not Pingtree-shaped) except for errors, which keep the one error model.
"""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from server.errors import ApiError
from server.sandbox import rules
from server.sandbox.faults import parse_faults
from server.sandbox.state import SandboxState

bp = Blueprint("sandbox_control", __name__, url_prefix="/_sandbox")

MAX_LOCK_SECONDS = 3600.0


def _state() -> SandboxState:
    return current_app.extensions["sandbox"]


def _json_body() -> Any:
    body = request.get_json(silent=True, force=True)  # control calls from curl often omit the type
    if body is None:
        raise ApiError(400, rules.INVALID_JSON)
    return body


@bp.get("/events")
def events() -> Response:
    """Accepted events, oldest first, filtered by ``cid``, ``event_id``, ``transaction_id``."""
    args = request.args
    return jsonify(
        events=_state().events(
            cid=args.get("cid"),
            event_id=args.get("event_id"),
            transaction_id=args.get("transaction_id"),
        )
    )


@bp.get("/requests")
def requests() -> Response:
    return jsonify(requests=_state().requests())


@bp.get("/stats")
def stats() -> Response:
    return jsonify(_state().stats())


@bp.post("/reset")
def reset() -> Response:
    _state().reset()
    return jsonify(status="ok")


@bp.get("/faults")
def faults() -> Response:
    return jsonify(faults=_state().faults())


@bp.post("/faults")
def set_faults() -> Response:
    _state().set_faults(parse_faults(_json_body()))
    return jsonify(faults=_state().faults())


@bp.delete("/faults")
def clear_faults() -> Response:
    _state().set_faults([])
    return jsonify(faults=[])


@bp.get("/config")
def config() -> Response:
    return jsonify(lock_seconds=_state().lock_seconds)


@bp.post("/config")
def set_config() -> Response:
    body = _json_body()
    if not isinstance(body, dict) or set(body) - {"lock_seconds"}:
        raise ApiError(400, "Invalid config: only lock_seconds can be set", invalid={"config": "unknown key"})
    if "lock_seconds" in body:
        value = body["lock_seconds"]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0 <= value <= MAX_LOCK_SECONDS
        ):
            message = f"should be a number of seconds from 0 to {MAX_LOCK_SECONDS:g}"
            raise ApiError(400, "Invalid lock_seconds", invalid={"lock_seconds": message})
        _state().lock_seconds = float(value)  # a float assignment is atomic; fire() reads it once
    return jsonify(lock_seconds=_state().lock_seconds)
