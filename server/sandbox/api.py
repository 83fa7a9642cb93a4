"""The emulated Event Postback API: both documented endpoints, with faults and request recording.

``POST /api/event/{campaign-id}`` (revenue as ``amount``) and ``POST /api/event/trigger`` (``cid``
in the body, revenue as ``revenue``). A view here is a thin adapter: the rules are in
:mod:`~server.sandbox.rules`, the lock and deduplication in :mod:`~server.sandbox.state`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from server.errors import ApiError, answer
from server.sandbox import rules
from server.sandbox.faults import Fault
from server.sandbox.state import SandboxState, utc_now

bp = Blueprint("sandbox_api", __name__)

DROP_KEY = "sandbox.drop_connection"
_REDACTED_HEADERS = frozenset({"authorization", "cookie"})  # never worth keeping in a log
_MAX_RECORDED_TEXT = 2000


class ConnectionDropped(ConnectionError):
    """A drop fault fired where no socket exists to close (e.g. Flask's test client)."""


@bp.post("/api/event/trigger")
def trigger() -> Response:
    return _handle(path_cid=None)


@bp.post("/api/event/<cid>")
def event_for_campaign(cid: str) -> Response:
    return _handle(path_cid=cid)


@bp.post("/api/event/global/<org_id>")
def global_event(org_id: str) -> Response:
    """The Global Event Postback API: no cid; the lead (and so its campaign) is found by transaction_id."""
    return _handle(path_cid=None, global_org=org_id)


def _handle(path_cid: str | None, global_org: str | None = None) -> Response:
    state: SandboxState = current_app.extensions["sandbox"]
    started = time.monotonic()
    raw = request.get_data()  # read the whole body first, so even a drop happens after the upload
    fault = state.take_fault()
    record: dict[str, Any] = {
        "received_at": utc_now(), "method": request.method, "path": request.path,
        "headers": _headers(), "body": _recorded_body(raw), "accepted": False,
        "fault": asdict(fault) if fault else None,
    }
    if fault and fault.when == "before":
        _sleep(fault)
        if not fault.processes_event:
            return _finish(state, record, started, _fault_answer(fault))
    status, result = _process(state, raw, path_cid, global_org)
    record["accepted"] = status == 200  # processed and recorded as an event
    if fault and fault.when == "after":
        _sleep(fault)
        if fault.drop or fault.status is not None:
            return _finish(state, record, started, _fault_answer(fault))
    return _finish(state, record, started, (status, result))


def _process(state: SandboxState, raw: bytes, path_cid: str | None, global_org: str | None) -> tuple[int, dict[str, Any]]:
    try:
        body = rules.parse_body(raw, request.mimetype)
        if global_org is not None:
            accepted = rules.check_global_event(state.campaigns, body, find_lead=state.lead_campaign)
        else:
            accepted = rules.check_event(state.campaigns, body, path_cid=path_cid)
        return 200, state.fire(accepted, body)
    except ApiError as exc:
        return exc.status, exc.body()


def _sleep(fault: Fault) -> None:
    # Server side, one thread per request: blocking here is exactly what a slow Pingtree does.
    if fault.delay_ms:
        time.sleep(fault.delay_ms / 1000)


def _fault_answer(fault: Fault) -> tuple[int | None, dict[str, Any] | None]:
    if fault.drop:
        return None, None
    status = fault.status or 500
    return status, answer(status, fault.answer_message())


def _finish(
    state: SandboxState, record: dict[str, Any], started: float,
    outcome: tuple[int | None, dict[str, Any] | None],
) -> Response:
    status, result = outcome
    record.update(status=status, answer=result, duration_ms=round((time.monotonic() - started) * 1000, 1))
    state.record_request(record)
    if status is None:
        request.environ[DROP_KEY] = True  # DropConnection closes the socket once Flask returns
        return Response(b"", 500)
    response = jsonify(result)
    response.status_code = status
    return response


def _headers() -> dict[str, str]:
    return {
        name.lower(): ("[redacted]" if name.lower() in _REDACTED_HEADERS else value)
        for name, value in request.headers.items()
    }


def _recorded_body(raw: bytes) -> Any:
    """The JSON value sent, or the start of the raw text when it is not JSON."""
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text[:_MAX_RECORDED_TEXT]


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class DropConnection:
    """WSGI middleware that turns a view's drop request into a TCP close with no HTTP answer.

    It sits outside Flask so that nothing (Flask's error handling, an access log) can turn the drop
    into a 500. The socket is only shut down, never closed: the server still owns the file
    descriptor, and its own write then fails with EPIPE, which gunicorn and werkzeug ignore quietly.
    The client sees the connection end without a response (httpx ``RemoteProtocolError``).
    """

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        result = self.app(environ, start_response)
        if not environ.get(DROP_KEY):
            return result
        close = getattr(result, "close", None)
        if close is not None:
            close()
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        if sock is None:
            raise ConnectionDropped("sandbox drop fault: connection closed without an answer")
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client already left: the drop happened anyway
        return []
