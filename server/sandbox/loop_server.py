"""Serve the sandbox on one asyncio event loop: a delay fault is a timer, not a sleeping thread.

``pingtree-relay sandbox`` and ``python -m server.sandbox`` run this. The event endpoints go
straight to :func:`~server.sandbox.api.handle_event` on the loop (a few dict operations, no I/O),
and each delay it yields becomes a ``call_later``: a Pingtree that answers in 300 ms can hold
thousands of answers at once, where 64 gunicorn threads capped it near 200 events/s. Everything
else (the control API, the page, errors of other routes) is the same Flask app, called through
WSGI in a small thread pool so that a large ``/_sandbox/requests`` never stalls the timers.

One process on purpose: the state (records, locks, fired events, faults) lives in its memory.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask

from server.config import Config
from server.errors import answer
from server.sandbox import api
from server.sandbox.app import MAX_BODY_BYTES, create_sandbox_app
from server.sandbox.http11 import HttpServer, Request, Respond, Response
from server.sandbox.state import SandboxState

_EVENT_PATH = re.compile(r"/api/event/(?:global/(?P<org>[^/]+)|(?P<cid>[^/]+))")
_JSON = [("content-type", "application/json")]
SHUTDOWN_GRACE_SECONDS = 5.0  # held answers get this long to go out on SIGTERM


# Flask's compact form (and its trailing newline), so both servers answer byte for byte alike; one
# encoder, not one per answer (json.dumps builds one for any argument but the defaults).
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def json_response(status: int, body: Any) -> Response:
    return Response(status, _COMPACT.encode(body).encode() + b"\n", list(_JSON))


def error_response(status: int, reason: str) -> Response:
    """A malformed request, in Pingtree's answer shape like every other sandbox error."""
    message = "Request Entity Too Large" if status == 413 else reason
    return json_response(status, answer(status, message))


class SandboxHandler:
    """Routes a parsed request: event endpoints on the loop, the rest through WSGI in a thread."""

    def __init__(self, app: Flask, pool: ThreadPoolExecutor) -> None:
        self.app = app
        self.state: SandboxState = app.extensions["sandbox"]
        self.pool = pool

    def __call__(self, request: Request, respond: Respond) -> None:
        match = _EVENT_PATH.fullmatch(request.path) if request.method == "POST" else None
        if match is None:
            self._wsgi(request, respond)
            return
        cid, org = match.group("cid"), match.group("org")
        req = api.EventRequest(
            method=request.method,
            path=request.path,
            headers=request.headers,
            raw=request.body,
            mimetype=request.header("content-type").split(";", 1)[0].strip().lower(),
            path_cid=None if cid in (None, "trigger") else cid,
            global_org=org,
        )
        _advance(api.handle_event(self.state, req), respond)

    def _wsgi(self, request: Request, respond: Respond) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, call_wsgi, self.app, request)
        future.add_done_callback(
            lambda f: respond(
                f.result() if f.exception() is None else error_response(500, "Internal server error")
            )
        )


def _advance(steps: api.EventSteps, respond: Respond, first: bool = True) -> None:
    """Run ``steps`` until its next delay, then again from a timer; answer when it is done."""
    try:
        delay = next(steps) if first else steps.send(None)
    except StopIteration as done:
        outcome: api.Outcome = done.value
        respond(
            Response(0, drop=True) if outcome.status is None else json_response(outcome.status, outcome.body)
        )
        return
    asyncio.get_running_loop().call_later(delay, _advance, steps, respond, False)


def call_wsgi(app: Callable[..., Iterable[bytes]], request: Request) -> Response:
    """Call a WSGI app with ``request`` and collect its whole answer."""
    host, _, port = request.header("host", "127.0.0.1").partition(":")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": request.path.encode("utf-8", "replace").decode("latin-1"),
        "QUERY_STRING": request.query,
        "SERVER_NAME": host,
        "SERVER_PORT": port or "80",
        "SERVER_PROTOCOL": request.version,
        "REMOTE_ADDR": (request.peer or ("127.0.0.1", 0))[0],
        "CONTENT_TYPE": request.header("content-type"),
        "CONTENT_LENGTH": str(len(request.body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers:
        if name not in ("content-type", "content-length"):
            key = "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    started: list[Any] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        started[:] = [int(status.split(" ", 1)[0]), headers]
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    headers = [(k, v) for k, v in started[1] if k.lower() not in ("content-length", "connection")]
    return Response(started[0], body, headers)


async def serve(
    config: Config,
    *,
    host: str,
    port: int,
    lock_seconds: float = 2.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve the sandbox until SIGTERM or SIGINT; ``ready(port)`` once it listens."""
    app = create_sandbox_app(config, lock_seconds=lock_seconds)
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-wsgi") as pool:
        server = HttpServer(SandboxHandler(app, pool), on_error=error_response, max_body=MAX_BODY_BYTES)
        bound = await server.start(host, port)
        if ready is not None:
            ready(bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.shutdown(SHUTDOWN_GRACE_SECONDS)


def run(
    config: Config,
    *,
    host: str,
    port: int,
    lock_seconds: float = 2.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Blocking entry point for the CLI; ``ready(port)`` once it listens (``port=0``: the kernel picks)."""
    asyncio.run(serve(config, host=host, port=port, lock_seconds=lock_seconds, ready=ready))
