"""A lean HTTP/1.1 server on asyncio, where an answer may be sent any time after its request arrived.

Why not gunicorn: the sandbox emulates a slow Pingtree by holding answers back (``delay_ms``). Under
a threaded server every held answer holds a thread, so 64 threads at 300 ms capped the sandbox near
200 events/s, and a benchmark of the relay measured the sandbox instead. Here a held answer is a
timer on the event loop: thousands cost next to nothing. And why not h11: its parser alone costs
about 150 us per request, which on a 2-core benchmark machine is CPU taken from the relay under test.

What it speaks: HTTP/1.1 and 1.0 keep-alive, bodies by ``Content-Length`` or ``chunked``,
``Expect: 100-continue``, pipelined requests answered in order. A request that breaks those rules
gets an error answer from ``on_error`` and the connection is closed. A handler is called with the
request and a ``respond`` callback, and calls it once, now or later (from the event loop thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; larger heads are refused with 431
_HEAD_END = b"\r\n\r\n"


@dataclass
class Request:
    """One parsed request; header names are lowercase, in arrival order (duplicates kept)."""

    method: str
    target: str  # as sent: path and query, percent-encoded
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: list[tuple[str, str]]
    body: bytes = b""
    peer: tuple[str, int] | None = None

    @property
    def path(self) -> str:
        """The decoded path, without the query (as WSGI's PATH_INFO)."""
        return unquote(self.target.split("?", 1)[0], errors="replace")

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def header(self, name: str, default: str = "") -> str:
        """The value of header ``name`` (lowercase); several values are joined with commas."""
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else default


@dataclass
class Response:
    """An answer; ``drop`` closes the connection without sending anything (a vanished server)."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    drop: bool = False


Respond = Callable[[Response], None]
Handler = Callable[[Request, Respond], None]
ErrorAnswer = Callable[[int, str], Response]


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def plain_error(status: int, reason: str) -> Response:
    return Response(status, reason.encode() + b"\n", [("content-type", "text/plain; charset=utf-8")])


def encode_response(response: Response, *, keep_alive: bool) -> bytes:
    """Status line, headers (``content-length`` and ``connection`` added here) and body."""
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {response.status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines.append(f"content-length: {len(response.body)}")
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def parse_head(head: bytes) -> Request:
    """Request line and headers (without the blank line); BadRequest when malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].startswith("/"):
        raise BadRequest(400, "malformed request line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
    return Request(method=parts[0], target=parts[1], version=parts[2], headers=headers)


class _Chunked:
    """Incremental decoder of a ``Transfer-Encoding: chunked`` body."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.body = bytearray()

    def feed(self, buf: bytearray) -> bool:
        """Move complete chunks out of ``buf``; True once the last chunk (and trailers) are consumed."""
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return False
            try:
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            except ValueError:
                raise BadRequest(400, "malformed chunk size") from None
            if size == 0:  # the last chunk, then optional trailers ending with a blank line
                end = eol if buf[eol : eol + 4] == _HEAD_END else buf.find(_HEAD_END, eol)
                if end < 0:
                    return False
                del buf[: end + 4]
                return True
            if len(self.body) + size > self.limit:
                raise BadRequest(413, "body too large")
            if len(buf) < eol + 2 + size + 2:
                return False
            self.body += buf[eol + 2 : eol + 2 + size]
            del buf[: eol + 2 + size + 2]


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse, hand each request to the handler, write answers in order."""

    def __init__(
        self, handler: Handler, on_error: ErrorAnswer, max_body: int, live: set[HttpProtocol]
    ) -> None:
        self.handler = handler
        self.on_error = on_error
        self.max_body = max_body
        self.live = live
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.current: Request | None = None  # parsed, waiting for its answer (one at a time, in order)
        self.pending_head: Request | None = None  # head parsed, body still arriving
        self.chunked: _Chunked | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self)
        self.closing = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > MAX_HEAD_BYTES + self.max_body + 1024 and self.transport is not None:
            self.transport.pause_reading()  # a pipelining client ahead of its answers: wait for them
        self._next()

    @property
    def busy(self) -> bool:
        """Whether a request is waiting for its answer (what a graceful shutdown waits for)."""
        return self.current is not None

    def _next(self) -> None:
        while self.current is None and not self.closing:
            try:
                request = self._parse_one()
            except BadRequest as exc:
                self._write(self.on_error(exc.status, exc.reason), keep_alive=False)
                return
            if request is None:
                return
            self.current = request
            self.handler(request, self._responder(request))

    def _parse_one(self) -> Request | None:
        if self.pending_head is None:
            end = self.buf.find(_HEAD_END)
            if end > MAX_HEAD_BYTES or (end < 0 and len(self.buf) > MAX_HEAD_BYTES):
                raise BadRequest(431, "request head too large")
            if end < 0:
                return None
            head = parse_head(bytes(self.buf[:end]))
            del self.buf[: end + 4]
            self._check_body_framing(head)
            self.pending_head = head
        head = self.pending_head
        if self.chunked is not None:
            if not self.chunked.feed(self.buf):
                return None
            head.body = bytes(self.chunked.body)
            self.chunked = None
        else:
            length = int(head.header("content-length", "0"))
            if len(self.buf) < length:
                return None
            head.body = bytes(self.buf[:length])
            del self.buf[:length]
        self.pending_head = None
        if self.transport is not None:
            head.peer = self.transport.get_extra_info("peername")
        return head

    def _check_body_framing(self, head: Request) -> None:
        encoding = head.header("transfer-encoding").lower()
        length = head.header("content-length")
        if encoding:
            if encoding != "chunked" or length:
                raise BadRequest(400, "unsupported transfer-encoding")
            self.chunked = _Chunked(self.max_body)
        elif length:
            if not length.isdigit():
                raise BadRequest(400, "malformed content-length")
            if int(length) > self.max_body:
                raise BadRequest(413, "body too large")
        if head.header("expect").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _responder(self, request: Request) -> Respond:
        def respond(response: Response) -> None:
            if self.current is not request:
                return  # answered twice, or the connection is gone: nothing to do
            self.current = None
            if response.drop:
                self.closing = True
                if self.transport is not None:
                    self.transport.abort()
                return
            self._write(response, keep_alive=_keep_alive(request))
            if self.transport is not None and not self.closing:
                self.transport.resume_reading()
                self._next()

        return respond

    def _write(self, response: Response, *, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(encode_response(response, keep_alive=keep_alive))
        if not keep_alive:
            self.closing = True
            self.transport.close()


def _keep_alive(request: Request) -> bool:
    connection = request.header("connection").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


class HttpServer:
    """Listen on ``host:port`` and serve ``handler``; :meth:`shutdown` waits for answers in flight."""

    def __init__(
        self, handler: Handler, *, on_error: ErrorAnswer = plain_error, max_body: int = 1024 * 1024
    ) -> None:
        self.handler = handler
        self.on_error = on_error
        self.max_body = max_body
        self.connections: set[HttpProtocol] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Start listening; the port bound (useful with ``port=0``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self.handler, self.on_error, self.max_body, self.connections),
            host,
            port,
            backlog=4096,
            reuse_address=True,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop listening, wait up to ``grace_seconds`` for held answers, then close every connection."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
