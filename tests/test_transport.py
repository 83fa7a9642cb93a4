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


# --- the codec: what it reads, what it refuses (each answer sent twice on one connection) ---------


def answering(*answers: bytes, close: bool = False) -> Handler:
    """A handler that reads one request per answer and sends it (then closes if ``close``)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
        if not close:
            await reader.read()  # until the client closes

    return handler


def exchange(
    answers: list[bytes], requests: int, *, close: bool = False, headers: dict[str, str] | None = None
) -> tuple[list[httpx.Response | Exception], int]:
    outcomes: list[httpx.Response | Exception] = []

    async def test(url: str, connections: list[int]) -> None:
        async with httpx.AsyncClient(transport=AsyncH11Transport(max_connections=1), timeout=5) as client:
            for _ in range(requests):
                try:
                    response = await client.post(url + "/api/event/c", content=b"{}", headers=headers)
                    await response.aread()
                    outcomes.append(response)
                except httpx.HTTPError as exc:
                    outcomes.append(exc)

    connections = serve(answering(*answers, close=close), test)
    return outcomes, len(connections)


def test_interim_answers_are_skipped_and_204_has_no_body() -> None:
    outcomes, connections = exchange(
        [
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 4\r\nX-A: 1\r\n\r\nnull",
        ],
        3,
    )
    assert [(r.status_code, r.content) for r in outcomes] == [(200, b"{}"), (204, b""), (200, b"null")]  # type: ignore[union-attr]
    assert connections == 1  # all kept alive


def test_http10_and_connection_close_answers_are_not_reused() -> None:
    outcomes, connections = exchange([b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"] * 2, 2)
    assert [r.status_code for r in outcomes] == [200, 200]  # type: ignore[union-attr]
    assert connections == 2
    outcomes, connections = exchange(
        [b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n{}"] * 2, 2
    )
    assert [r.status_code for r in outcomes] == [200, 200]  # type: ignore[union-attr]
    assert connections == 2


def test_a_request_that_asks_for_connection_close_does_not_reuse_its_connection() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    outcomes, connections = exchange([answer] * 2, 2, headers={"Connection": "keep-alive, Close"})
    assert [r.status_code for r in outcomes] == [200, 200]  # type: ignore[union-attr]
    assert connections == 2
    outcomes, connections = exchange([answer] * 2, 2, headers={"Connection": "keep-alive"})
    assert connections == 1


def test_an_answer_with_both_lengths_is_read_chunked_and_its_connection_not_reused() -> None:
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    outcomes, connections = exchange([both, both], 2)
    assert [r.content for r in outcomes] == [b"{}", b"{}"]  # type: ignore[union-attr]
    assert connections == 2


def test_chunked_answers_with_extensions_and_trailers() -> None:
    outcomes, _ = exchange(
        [
            b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=1\r\n{"\r\n3\r\na":\r\n1\r\n1\r\n1\r\n}\r\n0\r\nX-T: y\r\n\r\n'
        ],
        1,
    )
    assert outcomes[0].content == b'{"a":1}'  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            "conflicting Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}", "not a number"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}", "other than chunked"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "beyond"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "complete message body"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "complete answer head"),
    ],
)
def test_malformed_or_truncated_answers_are_protocol_errors_and_uncertain(answer: bytes, why: str) -> None:
    async def test(url: str, connections: list[int]) -> None:
        forwarder = AsyncForwarder(url, timeout=5)
        attempt = await forwarder.send("c", {})
        await forwarder.aclose()
        assert (attempt.status, attempt.error, attempt.uncertain) == (None, "RemoteProtocolError", True)

    serve(answering(answer, close=True), test)
    outcomes, _ = exchange([answer], 1, close=True)
    assert isinstance(outcomes[0], httpx.RemoteProtocolError) and why in str(outcomes[0]), outcomes[0]


def test_a_close_delimited_answer_beyond_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.transport.MAX_ANSWER_BYTES", 10)
    outcomes, _ = exchange([b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11], 1, close=True)
    assert isinstance(outcomes[0], httpx.RemoteProtocolError) and "beyond" in str(outcomes[0])


def test_the_request_on_the_wire_has_one_length_and_no_injected_header() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def test(url: str, connections: list[int]) -> None:
        async with httpx.AsyncClient(transport=AsyncH11Transport(), timeout=5) as client:
            await client.post(url + "/api/event/c?x=1", content=b'{"a":1}', headers={"X-Key": "k"})
            with pytest.raises(httpx.LocalProtocolError):
                await client.post(url, content=b"{}", headers={"X-Key": "k\r\nX-Evil: 1"})

    serve(record, test)
    head, body = seen[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /api/event/c?x=1 HTTP/1.1" and body == b'{"a":1}'
    assert [line.lower() for line in lines if line.lower().startswith(b"content-length")] == [
        b"content-length: 7"
    ]
    assert b"x-key: k" in [line.lower() for line in lines] and len(seen) == 1


def test_an_idle_connection_with_bytes_waiting_is_not_reused() -> None:
    """An upstream (or a proxy) that sends one answer too many: the next request must read its own
    answer, not that one (it would be taken for Pingtree's verdict on another event)."""

    async def one_answer_too_many(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        ok = (
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{"message":"ok"}'
        )
        stale = b'HTTP/1.1 200 OK\r\ncontent-length: 24\r\n\r\n{"message":"stale reply"}'
        writer.write(ok + stale)
        await writer.drain()
        await read_request(reader)  # a second request on this connection gets a refusal
        body = b'{"message":"Invalid event_id"}'
        writer.write(b"HTTP/1.1 400 Bad\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await asyncio.sleep(5)

    async def test(url: str, connections: list[int]) -> None:
        forwarder = AsyncForwarder(url, timeout=5)
        first = await forwarder.send("c", {})
        await asyncio.sleep(0.05)  # the stale answer is in the reader's buffer by now
        second = await forwarder.send("c", {})
        await forwarder.aclose()
        assert first.answer == {"message": "ok"}
        assert second.answer != {"message": "stale reply"}, "a stale answer was read as this request's"
        assert len(connections) == 2  # a fresh connection for the second request

    serve(one_answer_too_many, test)


async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A 200 whose 40-byte body comes a byte every 0.1 s: each read is quick, the whole takes 4 s."""
    await read_request(reader)
    body = b'{"message":"' + b"x" * 26 + b'"}'
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
    for byte in body:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


def test_an_engine_attempt_has_one_deadline_from_the_pool_wait_to_the_answer() -> None:
    """Each phase has its own timeout (pool, connect, write, read); the lease must outlast the whole
    attempt, so the whole is bounded too: waiting 0.3 s for the pool's one connection, then 0.3 s for
    the answer, is more than an attempt of 0.5 s may take."""

    async def slow_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.3)
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 16\r\n\r\n{"message":"ok"}')
            await writer.drain()

    async def test(url: str, connections: list[int]) -> None:
        forwarder = AsyncForwarder(url, timeout=0.5, max_connections=1)
        first = asyncio.create_task(forwarder.send("c", {}))
        await asyncio.sleep(0.01)  # the first takes the one connection
        second = await forwarder.send("c", {})
        await first
        await forwarder.aclose()
        assert (second.status, second.error, second.uncertain) == (None, "ReadTimeout", True)

    serve(slow_answers, test)


def test_an_inline_attempt_has_one_deadline_however_the_answer_trickles_in() -> None:
    from server.forwarder import Forwarder

    async def test(url: str, connections: list[int]) -> None:
        forwarder = Forwarder(url, timeout=5)
        attempt = await asyncio.to_thread(forwarder.send, "c", {}, timeout=0.5)
        forwarder.close()
        assert (attempt.status, attempt.error, attempt.uncertain) == (None, "ReadTimeout", True)

    serve(drip, test)
