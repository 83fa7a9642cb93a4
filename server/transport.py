"""An ``httpx.AsyncBaseTransport`` on asyncio streams and ``h11``: HTTP/1.1 keep-alive, nothing else.

Why our own transport: the delivery engine keeps hundreds of requests in flight on one event loop,
and the CPU per request is what caps delivery on a small box. httpx's default (httpcore on anyio)
spends most of it in its pool bookkeeping, which grows with the number of pooled connections
(measured in docs/durability.md). This pool is a deque of idle connections per origin: taking and
returning one costs O(1) however many are open. httpx stays the client (requests, responses,
timeouts, errors); only the wire is ours.

Errors are httpx's own classes, chosen as httpcore would, because the forwarder's classification
depends on them: a failure before the request was written is a ``ConnectError``/``ConnectTimeout``
(certainly not processed upstream); anything after is a ``ReadError``/``ReadTimeout``/
``RemoteProtocolError`` (the outcome is unknown).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator

import h11
import httpx

Origin = tuple[str, str, int]  # scheme, host, port


class _Connection:
    """One keep-alive connection: a stream pair and its h11 state machine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    def reusable(self) -> bool:
        # A peer that closed an idle connection shows as EOF on the reader once the loop saw it.
        return self.h11.our_state is h11.IDLE and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, content: bytes) -> None:
        self._content = content

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._content


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
        body = request.read()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        target = request.url.raw_path
        data = conn.h11.send(h11.Request(method=request.method, target=target, headers=headers))
        data += conn.h11.send(h11.Data(data=body)) if body else b""
        data += conn.h11.send(h11.EndOfMessage())
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
            # asyncio.timeout, not wait_for: wait_for wraps the coroutine in a task, a cost per request.
            async with asyncio.timeout(read_timeout):
                return await self._read_response(conn, request)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("read timed out", request=request) from exc

    async def _read_response(self, conn: _Connection, request: httpx.Request) -> httpx.Response:
        status, headers, chunks = 0, [], []
        while True:
            try:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    conn.h11.receive_data(await conn.reader.read(65536))
                    continue
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            except OSError as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
            if isinstance(event, h11.Response):
                status, headers = event.status_code, event.headers.raw_items()
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response", request=request
                )
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
        return httpx.Response(
            status, headers=headers, stream=_Body(b"".join(chunks)), extensions={"http_version": b"HTTP/1.1"}
        )

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
            host, port, ssl=tls, server_hostname=host if tls else None
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


async def _notify_all(condition: asyncio.Condition) -> None:
    async with condition:
        condition.notify_all()


def _insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
