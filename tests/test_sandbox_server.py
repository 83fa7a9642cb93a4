"""The sandbox's own server (server/sandbox/loop_server.py, http11.py): capacity and HTTP/1.1 manners.

Against the real thing, ``python -m server.sandbox`` on loopback, through raw sockets where the
wire format is the point. The rules themselves are tested in test_sandbox.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from bench.servers import REPORT_PORT, Server
from server.sandbox.http11 import BadRequest, _Chunked, parse_head
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG_TOML = """
[relay]
upstream_url = "http://127.0.0.1:9"
[campaigns.cmp_test.events.quote_viewed]
"""
ANSWER_KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}
T = TypeVar("T")


@contextmanager
def running_sandbox(
    tmp: Path, config_toml: str = CONFIG_TOML, *, lock_seconds: float = 0
) -> Iterator[Server]:
    """``python -m server.sandbox`` with ``config_toml`` on a port it binds itself and reports, once
    /healthz answers; stopped (its log closed by the wrapper) on the way out. test_sandbox.py uses it too."""
    config = tmp / "sandbox.toml"
    config.write_text(config_toml, encoding="utf-8")
    argv = [sys.executable, "-m", "server.sandbox", "--config", str(config), *REPORT_PORT]
    with Server([*argv, "--lock-seconds", f"{lock_seconds:g}"], tmp / "server.log").start(
        timeout=30
    ) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m server.sandbox`` on a free port, lock window 0 (every event is new anyway)."""
    with running_sandbox(tmp_path_factory.mktemp("loop-sandbox")) as sandbox:
        yield sandbox.url


@pytest.fixture
def live(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=10) as http:
        http.post("/_sandbox/reset")
        yield http
        http.post("/_sandbox/reset")


def _event(i: int | str) -> bytes:
    return json.dumps({"event_id": "quote_viewed", "transaction_id": f"t{i}"}).encode()


def _post(body: bytes, *, extra: str = "") -> bytes:
    return (
        f"POST /api/event/cmp_test HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _exchange(
    base: str,
    raw: bytes,
    *,
    answers: int = 1,
    expect_open: bool = False,
) -> tuple[list[tuple[int, Any]], bytes]:
    """Send ``raw`` on one connection; read ``answers`` answers; return them and what follows.

    What follows is b"" when the server closed the connection, b"<open>" when it stayed open for
    a moment (only asked for when open is expected: a slow close could not pass for an open one).
    """
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(raw)
        buf = b""
        out: list[tuple[int, Any]] = []
        while len(out) < answers:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            while b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                status = int(head.split(b" ", 2)[1])
                if status == 100:
                    buf = rest
                    continue
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                if len(rest) < length:
                    break
                out.append((status, json.loads(rest[:length]) if length else None))
                buf = rest[length:]
        sock.settimeout(0.5 if expect_open else 10)
        try:
            tail = sock.recv(65536)
        except TimeoutError:
            tail = b"<open>"
    return out, tail


# --- capacity: a delay is a timer, not a thread ---------------------------------------------------


def run_in_thread(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(coro_fn())`` in a thread of its own: the main thread may already run a loop
    (Playwright's sync API, when browser tests share this xdist worker), and asyncio.run refuses to nest."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


async def _held_posts(base: str, count: int) -> list[int]:
    host, port = base.removeprefix("http://").split(":")

    async def one(i: int) -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_post(_event(f"held{i}"), extra="Connection: close\r\n"))
        await writer.drain()
        data = await reader.read()  # until the server closes: the whole answer
        writer.close()
        return int(data.split(b" ", 2)[1])

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_a_thousand_delayed_answers_are_held_at_once(live: httpx.Client, server: str) -> None:
    """1,000 answers each held 10 s by a delay fault are all waiting together, then all answered.

    With 64 server threads, at most 64 could be held: ``held`` could never reach 1,000. (10 s: time
    for 1,000 connections to send their request on a loaded machine before the first answer is due.)
    """
    live.post("/_sandbox/faults", json={"delay_ms": 10_000, "when": "before"})
    seen: list[int] = []

    def all_held() -> bool:
        stats = live.get("/_sandbox/stats").json()  # the control API still answers meanwhile
        seen.append(stats["held"])
        return stats["held"] >= 1000

    async def scenario() -> list[int]:
        posts = asyncio.ensure_future(_held_posts(server, 1000))
        await asyncio.to_thread(wait_for, all_held, 60, 0.05, "1,000 answers held at once")
        return await posts

    statuses = run_in_thread(scenario)
    assert statuses == [200] * 1000
    stats = live.get("/_sandbox/stats").json()
    assert (stats["accepted"], stats["held"], stats["faults_applied"]) == (1000, 0, 1000), seen[-5:]


def test_sigterm_sends_a_held_answer_before_exiting(tmp_path: Path) -> None:
    with running_sandbox(tmp_path) as sandbox:
        base = sandbox.url
        httpx.post(base + "/_sandbox/faults", json={"delay_ms": 4000, "when": "after"}).raise_for_status()

        async def held_then_term() -> int:
            task = asyncio.ensure_future(_held_posts(base, 1))
            await asyncio.to_thread(
                wait_for,
                lambda: httpx.get(base + "/_sandbox/stats").json()["held"] == 1,
                30,
                0.05,
                "the answer to be held",
            )
            assert sandbox.proc is not None
            sandbox.proc.send_signal(signal.SIGTERM)
            return (await task)[0]

        assert run_in_thread(held_then_term) == 200
        assert sandbox.proc is not None and sandbox.proc.wait(timeout=15) == 0


# --- HTTP/1.1 on the wire ---------------------------------------------------------------------------


def test_keep_alive_and_pipelined_requests_answer_in_order(live: httpx.Client, server: str) -> None:
    answers, tail = _exchange(
        server, _post(_event("p1")) + _post(b"nope") + _post(_event("p2")), answers=3, expect_open=True
    )
    assert [status for status, _ in answers] == [200, 400, 200]
    assert (
        answers[0][1]["data"]["transaction_id"] == "tp1" and answers[2][1]["data"]["transaction_id"] == "tp2"
    )
    assert tail == b"<open>"  # still open for the next request
    assert [e["transaction_id"] for e in live.get("/_sandbox/events").json()["events"]] == ["tp1", "tp2"]


def test_chunked_body_and_expect_continue(live: httpx.Client, server: str) -> None:
    body = _event("chunked")
    raw = (
        b"POST /api/event/trigger HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    body = json.dumps({"cid": "cmp_test", **json.loads(body)}).encode()
    raw += b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
    [(status, answer)], _ = _exchange(server, raw, expect_open=True)
    assert status == 200 and answer["data"]["transaction_id"] == "tchunked"


def test_http10_without_keep_alive_is_closed_after_the_answer(server: str) -> None:
    raw = _post(_event("old")).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    [(status, _)], tail = _exchange(server, raw)
    assert (status, tail) == (200, b"")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /api/event/cmp_test HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
        (b"POST /api/event/cmp_test HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /api/event/cmp_test HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 431),
    ],
)
def test_malformed_requests_get_a_pingtree_shaped_error_and_a_close(
    server: str, raw: bytes, status: int
) -> None:
    [(got, answer)], tail = _exchange(server, raw)
    assert got == status and set(answer) == ANSWER_KEYS and answer["type"] == "error"
    assert tail == b""


def test_global_endpoint_is_served_on_the_loop(live: httpx.Client) -> None:
    unknown = live.post("/api/event/global/org_1", json=json.loads(_event("nolead")))
    assert (unknown.status_code, unknown.json()["message"]) == (404, "Lead Not Found")
    assert live.post("/api/event/cmp_test", json=json.loads(_event("lead"))).status_code == 200
    again = live.post("/api/event/global/org_1", json=json.loads(_event("lead")))
    # The lead named its campaign, whose rules then apply: the same event again is a duplicate.
    assert (again.status_code, again.json()["message"]) == (400, "Duplicate event for this transaction_id")


def test_other_routes_go_through_flask(live: httpx.Client) -> None:
    wrong_method = live.get("/api/event/cmp_test")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == ANSWER_KEYS
    assert live.get("/nope").status_code == 404
    assert "Pingtree sandbox" in live.get("/").text
    assert live.post("/api/event/cmp_test/extra", json={}).status_code == 404
    # Percent-encoded campaign ids are decoded as Flask would.
    assert live.post("/api/event/cmp%5Ftest", json=json.loads(_event("enc"))).status_code == 200


# --- pure pieces --------------------------------------------------------------------------------------


def test_parse_head_keeps_duplicate_headers_lowercase() -> None:
    request = parse_head(b"POST /a%20b?x=1 HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nHost: h")
    assert (request.path, request.query, request.header("x-a"), request.header("host")) == (
        "/a b",
        "x=1",
        "1,2",
        "h",
    )
    with pytest.raises(BadRequest):
        parse_head(b"POST /a HTTP/1.1\r\nno colon")


def test_chunked_decoder_waits_for_the_last_chunk() -> None:
    decoder = _Chunked(limit=100)
    buf = bytearray(b"3\r\nabc\r\n")
    assert decoder.feed(buf) is False and buf == b""
    buf += b"2;ext=1\r\nde\r\n0\r\n\r\nNEXT"
    assert decoder.feed(buf) is True
    assert bytes(decoder.body) == b"abcde" and bytes(buf) == b"NEXT"
    with pytest.raises(BadRequest):
        _Chunked(limit=2).feed(bytearray(b"3\r\nabc\r\n"))
