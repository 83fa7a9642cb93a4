"""The emulated Event Postback API: both documented endpoints, with faults and request recording.

``POST /api/event/{campaign-id}`` (revenue as ``amount``), ``POST /api/event/trigger`` (``cid``
in the body, revenue as ``revenue``) and ``POST /api/event/global/{org-id}`` (the lead names the
campaign). The rules are in :mod:`~server.sandbox.rules`, the lock and
deduplication in :mod:`~server.sandbox.state`; :func:`handle_event` here is the whole request
without any I/O. It *yields* each fault delay instead of sleeping, so whoever serves it decides how
to wait: the Flask views below sleep in their thread (the demo, the test client), the sandbox's own
server (:mod:`~server.sandbox.loop_server`) sets a timer and holds no thread at all.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EventRequest:
    """What an event endpoint needs of a request; ``path_cid`` is None for ``/api/event/trigger``."""

    method: str
    path: str
    headers: Iterable[tuple[str, str]]
    raw: bytes
    mimetype: str  # the Content-Type without parameters, lowercase ("" when absent)
    path_cid: str | None
    global_org: str | None = None  # set for ``/api/event/global/{org-id}``: the lead names the campaign


@dataclass(frozen=True)
class Outcome:
    """The answer to send: ``status`` None means close the connection without any answer."""

    status: int | None
    body: dict[str, Any] | None


# Yields delays in seconds, returns the outcome: ``steps.send(None)`` after each wait.
EventSteps = Generator[float, None, Outcome]


def handle_event(state: SandboxState, req: EventRequest) -> EventSteps:
    """One event request, fault included: yields each delay to wait, returns the :class:`Outcome`."""
    started = time.monotonic()
    fault = state.take_fault()  # the whole body was read first, so even a drop happens after the upload
    try:
        parsed: dict[str, Any] | ApiError = rules.parse_body(req.raw, req.mimetype)
    except ApiError as exc:  # answered once the event is processed (a fault may come first)
        parsed = exc
    record: dict[str, Any] = {
        "received_at": utc_now(),
        "method": req.method,
        "path": req.path,
        "headers": _recorded_headers(req.headers),
        # What was sent: the object parsed once for both the record and the rules, else the text.
        "body": _recorded_body(req.raw) if isinstance(parsed, ApiError) else parsed,
        "accepted": False,
        "fault": dict(fault.as_dict) if fault else None,
    }
    if fault and fault.when == "before":
        yield from _delay(state, fault)
        if not fault.processes_event:
            return _finish(state, record, started, _fault_answer(fault))
    status, result = _process(state, req, parsed)
    record["accepted"] = status == 200  # processed and recorded as an event
    if fault and fault.when == "after":
        yield from _delay(state, fault)
        if fault.drop or fault.status is not None:
            return _finish(state, record, started, _fault_answer(fault))
    return _finish(state, record, started, Outcome(status, result))


def _delay(state: SandboxState, fault: Fault) -> Generator[float, None, None]:
    if fault.delay_ms:
        state.hold(+1)
        try:
            yield fault.delay_ms / 1000
        finally:
            state.hold(-1)


def run_blocking(steps: EventSteps) -> Outcome:
    """Run ``steps`` in this thread, sleeping through each delay (what a threaded server does)."""
    try:
        while True:
            time.sleep(next(steps))
    except StopIteration as done:
        return done.value


@bp.post("/api/event/trigger")
def trigger() -> Response:
    return _respond(path_cid=None)


@bp.post("/api/event/<cid>")
def event_for_campaign(cid: str) -> Response:
    return _respond(path_cid=cid)


@bp.post("/api/event/global/<org_id>")
def global_event(org_id: str) -> Response:
    """The Global Event Postback API: no cid; the lead (and so its campaign) is found by transaction_id."""
    return _respond(path_cid=None, global_org=org_id)


def _respond(path_cid: str | None, global_org: str | None = None) -> Response:
    state: SandboxState = current_app.extensions["sandbox"]
    req = EventRequest(
        method=request.method,
        path=request.path,
        headers=request.headers.items(),
        raw=request.get_data(),
        mimetype=request.mimetype,
        path_cid=path_cid,
        global_org=global_org,
    )
    outcome = run_blocking(handle_event(state, req))
    if outcome.status is None:
        request.environ[DROP_KEY] = True  # DropConnection closes the socket once Flask returns
        return Response(b"", 500)
    response = jsonify(outcome.body)
    response.status_code = outcome.status
    return response


def _process(
    state: SandboxState, req: EventRequest, parsed: dict[str, Any] | ApiError
) -> tuple[int, dict[str, Any]]:
    """The event's answer: ``parsed`` is its body (:func:`rules.parse_body`), or why it has none."""
    try:
        if isinstance(parsed, ApiError):
            raise parsed
        body = parsed
        if req.global_org is not None:
            accepted = rules.check_global_event(state.campaigns, body, find_lead=state.lead_campaign)
        else:
            accepted = rules.check_event(state.campaigns, body, path_cid=req.path_cid)
        return 200, state.fire(accepted, body)
    except ApiError as exc:
        return exc.status, exc.body()


def _fault_answer(fault: Fault) -> Outcome:
    if fault.drop:
        return Outcome(None, None)
    status = fault.status or 500
    return Outcome(status, answer(status, fault.answer_message()))


def _finish(state: SandboxState, record: dict[str, Any], started: float, outcome: Outcome) -> Outcome:
    record.update(
        status=outcome.status, answer=outcome.body, duration_ms=round((time.monotonic() - started) * 1000, 1)
    )
    state.record_request(record)
    return outcome


def _recorded_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {
        name.lower(): ("[redacted]" if name.lower() in _REDACTED_HEADERS else value)
        for name, value in headers
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
