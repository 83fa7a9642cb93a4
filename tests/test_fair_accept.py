"""Keep-alive connections spread over every gunicorn worker (server/worker.py, "fair accept").

Without it, a burst of new connections lands on whichever worker is awake first: 400 connections
opened at once to four workers gave 401/1/1/1, and one process did the whole box's work.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from typing import Any

import httpx

from server.worker import ConnectionTable, over_share
from tests.conftest import RelayFactory, wait_for

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"


def _answer(sock: socket.socket, *, idle_close_ok: bool = False) -> bytes:
    """One whole answer to REQUEST (small: headers and a JSON body) from a blocking socket.
    ``idle_close_ok``: b"" when the server had closed the kept-alive connection before the request
    came (its 5 s keep-alive timeout; any HTTP client then retries on a new connection)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    if idle_close_ok and not data:
        return data
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    return data


def _worker_of(answer: bytes) -> str:
    """Which worker process answered: X-Request-Id is a random per-process prefix (24 hex digits)
    and a counter (server/logs.py)."""
    head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next(
        line.split(":", 1)[1].strip()[:24] for line in head.split("\r\n") if line.startswith("x-request-id:")
    )


def _closes(answer: bytes) -> bool:
    return b"\r\nconnection: close" in answer.split(b"\r\n\r\n", 1)[0].lower()


def _live_workers(relay_url: str) -> int:
    body: dict[str, Any] = httpx.get(relay_url + "/readyz", timeout=10).json()
    return len(body.get("workers", {}).get("connections", []))


def _open(port: int, count: int) -> tuple[list[socket.socket], Counter[str]]:
    """``count`` connections opened at once, one request each; which worker answered how many."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    for sock in socks:
        sock.sendall(REQUEST)
    return socks, Counter(_worker_of(_answer(sock)) for sock in socks)


def test_the_table_is_shared_with_forked_workers_and_ignores_stale_or_stopping_ones() -> None:
    table = ConnectionTable()
    mine = table.claim(age=1, pid=os.getpid())
    table.publish(mine, os.getpid(), accepting=True, connections=9)
    child = os.fork()
    if child == 0:  # a worker forked from the same master writes its own slot
        slot = table.claim(age=2, pid=os.getpid())
        table.publish(slot, os.getpid(), accepting=True, connections=3)
        os._exit(0)
    os.waitpid(child, 0)
    assert sorted(table.live()) == [3, 9] and table.least() == 3
    stopping = table.claim(age=3, pid=12345)
    table.publish(stopping, 12345, accepting=False, connections=0)  # shutting down: does not count
    assert table.least() == 3
    # A slot whose heartbeat is old is a worker that died without clearing it.
    table._SLOT.pack_into(table._memory, 5 * table._SLOT.size, 999, 1, 0, time.monotonic() - 60)
    assert table.least() == 3
    assert table.claim(age=5, pid=4242) == 5  # and its slot can be taken
    table.clear(mine)
    assert table.live() == [3]


def test_a_worker_hands_connections_back_only_well_above_the_least_loaded() -> None:
    assert not over_share(10, None)  # alone
    assert not over_share(32, 0) and over_share(33, 0)
    assert not over_share(60, 20) and not over_share(232, 100) and over_share(233, 100)


def test_a_burst_of_connections_is_spread_over_every_worker(relay_factory: RelayFactory) -> None:
    relay = relay_factory(workers=4)
    wait_for(lambda: _live_workers(relay.url) == 4, timeout=60, message="four workers up")
    socks, per_worker = _open(relay.port, 200)
    try:
        # Even would be 50 each; without fair accept one worker took nearly all (401/1/1/1 of 400).
        assert len(per_worker) == 4 and min(per_worker.values()) >= 25, per_worker
    finally:
        for sock in socks:
            sock.close()


def test_connections_taken_before_a_worker_came_up_move_to_it(relay_factory: RelayFactory) -> None:
    relay = relay_factory(workers=1)
    socks, per_worker = _open(relay.port, 200)
    handed_back, moved = 0, Counter[str]()
    (first,) = per_worker  # all on the one worker

    def one_round() -> bool:
        """A request on every connection (which also keeps them from idling out meanwhile)."""
        nonlocal handed_back
        for i, sock in enumerate(socks):
            try:
                sock.sendall(REQUEST)
                answer = _answer(sock, idle_close_ok=True)
            except BrokenPipeError:
                answer = b""
            if not answer:  # idled out (a slow round on a loaded machine): a new connection
                sock.close()
                socks[i] = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
                socks[i].sendall(REQUEST)
                _answer(socks[i])
                continue
            if _closes(answer):  # answered, then closed politely: the client reconnects
                assert _worker_of(answer) == first
                handed_back += 1
                sock.close()
                socks[i] = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
                socks[i].sendall(REQUEST)
                moved[_worker_of(_answer(socks[i]))] += 1
        return handed_back >= 40

    try:
        assert relay.proc is not None
        os.kill(relay.proc.pid, signal.SIGTTIN)  # gunicorn: one more worker
        # Settles near 2 x least + 32 on the first worker (server.worker.over_share): ~56 move.
        wait_for(one_round, timeout=90, interval=0, message="connections handed back")
        assert sum(n for worker, n in moved.items() if worker != first) >= 30, moved  # to the new worker
    finally:
        for sock in socks:
            sock.close()
