"""The engine's HTTP/1.1 transport over real loopback sockets: reuse, framing, and the error classes
the forwarder's classification depends on (connect errors are certain, the rest uncertain)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable

import httpx
import pytest

from server.forwarder import AsyncForwarder
from server.transport import AsyncH11Transport
from tests.conftest import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return head + await reader.readexactly(length)


def serve(handler: Handler, test: Callable[[str, list[int]], Awaitable[None]]) -> list[int]:
    """Run ``test(url, connections)`` against a loopback server running ``handler`` per connection."""
    connections: list[int] = []

    async def main() -> None:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await test(f"http://127.0.0.1:{port}", connections)

    # In a thread of its own: a browser test earlier in this process may have left an event loop
    # running in the main thread (Playwright's sync API), and asyncio.run refuses to nest.
    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # re-raised in the test's thread below
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the loopback exchange hung"
    if failures:
        raise failures[0]
    return connections


async def keep_alive_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{"message":"ok"}'
        )
        await writer.drain()


def test_connections_are_kept_alive_and_reused() -> None:
    async def test(url: str, connections: list[int]) -> None:
        transport = AsyncH11Transport(max_connections=4)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                await asyncio.gather(*(client.post(url + "/api/event/c", json={"a": i}) for i in range(4)))
            answers = await asyncio.gather(*(client.post(url + "/x", json={}) for _ in range(8)))
        assert {r.status_code for r in answers} == {200} and answers[0].json() == {"message": "ok"}
        assert len(connections) == 4  # never more than the pool's size, reused across rounds

    serve(keep_alive_json, test)


def test_chunked_and_close_delimited_answers_are_read_whole() -> None:
    async def chunked_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\nretry-after: 7\r\n\r\n"
            b'5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n'
        )
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Busy\r\nconnection: close\r\n\r\nlater")
        await writer.drain()

    async def test(url: str, connections: list[int]) -> None:
        forwarder = AsyncForwarder(url, timeout=5)
        first = await forwarder.send("c", {})
        second = await forwarder.send("c", {})
        third = await forwarder.send("c", {})  # the server closed: a new connection, same handler
        await forwarder.aclose()
        assert (first.status, first.answer, first.retry_after) == (201, {"a": 1}, 7.0)
        assert (second.status, second.answer, second.uncertain) == (503, {"message": "later"}, True)
        assert third.status == 201 and len(connections) == 2

    serve(chunked_then_close, test)


def test_a_refused_connection_is_certain_and_a_read_timeout_uncertain() -> None:
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def test(url: str, connections: list[int]) -> None:
        slow = AsyncForwarder(url, timeout=0.3)
        timed_out = await slow.send("c", {})
        await slow.aclose()
        assert (timed_out.status, timed_out.error, timed_out.uncertain) == (None, "ReadTimeout", True)
        refused = AsyncForwarder(f"http://127.0.0.1:{closed_port()}", timeout=2)
        attempt = await refused.send("c", {})
        await refused.aclose()
        assert (attempt.status, attempt.error, attempt.uncertain) == (None, "connect: ConnectError", False)
        assert refused.last is not None and refused.last[1] is False

    serve(never_answers, test)


def test_a_connection_dropped_before_the_answer_is_uncertain() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # then close without a word: the request may have been processed

    async def test(url: str, connections: list[int]) -> None:
        forwarder = AsyncForwarder(url, timeout=5)
        attempt = await forwarder.send("c", {})
        await forwarder.aclose()
        assert (attempt.status, attempt.uncertain) == (None, True)
        assert attempt.error == "RemoteProtocolError"

    serve(hang_up, test)


def test_a_full_pool_makes_requests_wait_then_times_out() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()

    async def test(url: str, connections: list[int]) -> None:
        transport = AsyncH11Transport(max_connections=1)
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5, pool=0.1)) as client:
            first = asyncio.create_task(client.post(url, content=b"{}"))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await client.post(url, content=b"{}")
            assert (await first).status_code == 200

    serve(slow, test)


def closed_port() -> int:
    port = free_port()
    with socket.socket() as s:  # nothing listens on it once this is closed
        s.bind(("127.0.0.1", port))
    return port
