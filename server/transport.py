"""An ``httpx.AsyncBaseTransport`` on asyncio streams: HTTP/1.1 keep-alive, nothing else.

Why our own transport: the delivery engine keeps hundreds of requests in flight on one event loop,
and the CPU per request is what caps delivery on a small box. httpx's default (httpcore on anyio)
spends most of it in its pool bookkeeping, which grows with the number of pooled connections
(measured in docs/durability.md). This pool is a deque of idle connections per origin: taking and
returning one costs O(1) however many are open. httpx stays the client (requests, responses,
timeouts, errors); only the wire is ours.

The wire is a small HTTP/1.1 client codec (RFC 9112) rather than ``h11``: a request is one
``bytes`` built from httpx's headers, an answer is read with ``readuntil``/``readexactly``. h11's
event machinery was a third of the delivery process's CPU (docs/benchmarks.md). What it reads:
``Content-Length``, ``chunked`` and close-delimited bodies, interim ``1xx`` answers skipped, no body
for ``204``/``304``; what it refuses as a protocol error: a malformed status line or header, a
header folded over lines, conflicting lengths, a transfer coding other than chunked, a head beyond
``MAX_HEAD_BYTES`` or a body beyond ``MAX_ANSWER_BYTES`` (Pingtree answers a few hundred bytes).

Errors are httpx's own classes, chosen as httpcore would, because the forwarder's classification
depends on them: a failure before the request was written is a ``ConnectError``/``ConnectTimeout``
(certainly not processed upstream); anything after is a ``ReadError``/``ReadTimeout``/
``RemoteProtocolError`` (the outcome is unknown).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque

import httpx

Origin = tuple[str, str, int]  # scheme, host, port

MAX_HEAD_BYTES = 64 * 1024  # the status line and headers of one answer: the stream's readuntil limit
MAX_ANSWER_BYTES = 1024 * 1024  # one answer's body
# A header name is a token (RFC 9110 5.1); a value holds no CR, LF or NUL (either way, ours or theirs).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE_VALUE = re.compile(rb"[\r\n\0]")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: .*)?")


class _Connection:
    """One keep-alive connection: a stream pair, and whether it may carry another exchange."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle = True  # False from a request's first byte until its answer was read whole, kept alive

    def reusable(self) -> bool:
        # A peer that closed an idle connection shows as EOF on the reader once the loop saw it.
        # Bytes already waiting on an idle connection are no answer of ours (an upstream or proxy
        # that sent one too many): the next request would read them as its own answer.
        return (
            self.idle
            and not self.reader.at_eof()
            and not self.reader._buffer  # type: ignore[attr-defined]
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        self.writer.close()


class AsyncH11Transport(httpx.AsyncBaseTransport):
    """Up to ``max_connections`` per origin; a request beyond that waits for a free one (pool timeout)."""

    def __init__(self, *, max_connections: int = 100, verify: ssl.SSLContext | bool = True) -> None:
        self.max_connections = max_connections
        self._ssl = (
            verify
            if isinstance(verify, ssl.SSLContext)
            else (ssl.create_default_context() if verify else _insecure_context())
        )
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._open: dict[Origin, int] = {}
        self._freed: dict[Origin, asyncio.Condition] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        origin: Origin = (
            request.url.scheme,
            request.url.host,
            request.url.port or (443 if request.url.scheme == "https" else 80),
        )
        conn = await self._acquire(origin, timeouts.get("connect"), timeouts.get("pool"))
        try:
            response = await self._exchange(conn, request, timeouts.get("write"), timeouts.get("read"))
        except BaseException:
            self._discard(origin, conn)
            raise
        self._release(origin, conn)
        return response

    async def _exchange(
        self,
        conn: _Connection,
        request: httpx.Request,
        write_timeout: float | None,
        read_timeout: float | None,
    ) -> httpx.Response:
        data, close = _request_bytes(request)
        conn.idle = False
        try:
            conn.writer.write(data)
            # A request fits the socket's buffer: write() sent it all, and drain() (with its timeout,
            # a cost per request) only has to wait when the kernel took part of it.
            if conn.writer.transport.get_write_buffer_size():
                async with asyncio.timeout(write_timeout):
                    await conn.writer.drain()
        except TimeoutError as exc:
            raise httpx.WriteTimeout("write timed out", request=request) from exc
        except OSError as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from exc
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the coroutine in a task, a cost per
            # request; and none at all without a read timeout (the caller's deadline bounds it).
            if read_timeout is None:
                return await self._read_response(conn, request, close)
            async with asyncio.timeout(read_timeout):
                return await self._read_response(conn, request, close)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("read timed out", request=request) from exc
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.RemoteProtocolError(f"malformed answer: {exc}", request=request) from exc
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc

    async def _read_response(self, conn: _Connection, request: httpx.Request, close: bool) -> httpx.Response:
        """The answer to ``request`` (``close``: it asked for ``Connection: close``)."""
        reader = conn.reader
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                message = (
                    "peer closed connection without sending a complete answer head"
                    if exc.partial
                    else "Server disconnected without sending a response"
                )
                raise httpx.RemoteProtocolError(message, request=request) from exc
            version, status, headers = _parse_head(head)
            if status == 101:
                raise ValueError("101 Switching Protocols was not asked for")
            if not 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the next
                break
        framing: dict[bytes, bytes] = {}  # the headers that decide the body's length and the reuse
        for name, value in headers:
            key = name.lower()
            if key == b"content-length":
                if framing.setdefault(key, value) != value:
                    raise ValueError("conflicting Content-Length headers")
            elif key in (b"transfer-encoding", b"connection"):  # a list, possibly over several lines
                framing[key] = framing[key] + b", " + value if key in framing else value
        keep_alive = version == 1 and b"close" not in framing.get(b"connection", b"").lower() and not close
        try:
            if status in (204, 304) or request.method == "HEAD":
                body = b""
            elif b"transfer-encoding" in framing:
                if framing[b"transfer-encoding"].strip().lower() != b"chunked":
                    raise ValueError("a transfer coding other than chunked")
                body = await _read_chunked(reader)
                if b"content-length" in framing:  # both: chunked wins, but never trust the stream again
                    keep_alive = False  # (RFC 9112 6.3: a sign of request smuggling)
            elif b"content-length" in framing:
                length = framing[b"content-length"].strip()
                if not length.isdigit():
                    raise ValueError("a Content-Length that is not a number")
                if int(length) > MAX_ANSWER_BYTES:
                    raise ValueError(f"an answer beyond {MAX_ANSWER_BYTES} bytes")
                body = await reader.readexactly(int(length))
            else:  # delimited by the connection's close
                keep_alive = False
                body = await _read_to_close(reader)
        except asyncio.IncompleteReadError as exc:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body", request=request
            ) from exc
        conn.idle = keep_alive
        # content=, not a stream: httpx reads it at once, so aread() costs nothing (8 us an answer less)
        return httpx.Response(status, headers=headers, content=body, extensions={"http_version": b"HTTP/1.1"})

    # --- the pool ---------------------------------------------------------------------------------

    async def _acquire(
        self, origin: Origin, connect_timeout: float | None, pool_timeout: float | None
    ) -> _Connection:
        idle = self._idle.setdefault(origin, deque())
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the peer
            if conn.reusable():
                return conn
            self._discard(origin, conn)
        freed = self._freed.setdefault(origin, asyncio.Condition())
        if self._open.get(origin, 0) >= self.max_connections:
            try:
                async with freed:
                    await asyncio.wait_for(
                        freed.wait_for(
                            lambda: bool(idle) or self._open.get(origin, 0) < self.max_connections
                        ),
                        pool_timeout,
                    )
            except TimeoutError as exc:
                raise httpx.PoolTimeout("no connection free in the pool") from exc
            return await self._acquire(origin, connect_timeout, pool_timeout)
        self._open[origin] = self._open.get(origin, 0) + 1
        try:
            async with asyncio.timeout(connect_timeout):
                return await self._connect(origin)
        except BaseException as exc:
            self._open[origin] -= 1
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout("connect timed out") from exc
            if isinstance(exc, OSError):
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            raise

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        tls = self._ssl if scheme == "https" else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls else None, limit=MAX_HEAD_BYTES
        )
        return _Connection(reader, writer)

    def _release(self, origin: Origin, conn: _Connection) -> None:
        if self._closed or not conn.reusable():
            self._discard(origin, conn)
            return
        self._idle[origin].append(conn)
        self._notify(origin)

    def _discard(self, origin: Origin, conn: _Connection) -> None:
        conn.close()
        self._open[origin] = max(0, self._open.get(origin, 0) - 1)
        self._notify(origin)

    def _notify(self, origin: Origin) -> None:
        freed = self._freed.get(origin)
        if freed is not None and freed._waiters:  # type: ignore[attr-defined]
            asyncio.get_running_loop().create_task(_notify_all(freed))

    async def aclose(self) -> None:
        self._closed = True
        for origin, idle in self._idle.items():
            while idle:
                self._discard(origin, idle.pop())


def _request_bytes(request: httpx.Request) -> tuple[bytes, bool]:
    """The request on the wire (its line, httpx's headers with our Content-Length, its body), and
    whether it asks for ``Connection: close``."""
    body = request.read()
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    close = False
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name) or _UNSAFE_VALUE.search(value):
            raise httpx.LocalProtocolError(f"illegal header {name!r}", request=request)
        key = name.lower()
        if key in (b"content-length", b"transfer-encoding"):
            continue  # the body is sent whole, with its length
        if key == b"connection":
            close = close or b"close" in value.lower()
        lines += (name, b": ", value, b"\r\n")
    lines += (b"content-length: ", str(len(body)).encode("ascii"), b"\r\n\r\n", body)
    return b"".join(lines), close


def _parse_head(head: bytes) -> tuple[int, int, list[tuple[bytes, bytes]]]:
    """An answer's status line and headers (``head`` ends with the blank line): (minor version,
    status, headers as sent). ValueError for anything malformed."""
    lines = head[:-4].split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # a folded line starts with a space: no token
            raise ValueError(f"a malformed header line: {line[:80]!r}")
        value = value.strip(b" \t")
        if _UNSAFE_VALUE.search(value):
            raise ValueError(f"a header value with a control character: {name!r}")
        headers.append((name, value))
    return int(status_line[1]), int(status_line[2]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size_line = (await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0].strip()
        if not size_line or size_line.strip(b"0123456789abcdefABCDEF"):
            raise ValueError(f"a malformed chunk size: {size_line[:20]!r}")
        size = int(size_line, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, ignored
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer beyond {MAX_ANSWER_BYTES} bytes")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("a chunk not followed by CRLF")


async def _read_to_close(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer beyond {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


async def _notify_all(condition: asyncio.Condition) -> None:
    async with condition:
        condition.notify_all()


def _insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
