"""Slow clients (slowloris headers, slow bodies) cannot starve ``serve``: legitimate requests are
answered while 50 of them trickle bytes, and each slow one is cut off after the read deadline.

A real relay (gunicorn via the CLI, one worker with 4 threads: far fewer than the slow clients, which
would matter only if a slow client could hold a thread),
raw sockets on 127.0.0.1; bounded: 50 sockets, a few seconds of trickling, deadlines polled.
"""

from __future__ import annotations

import socket
import time

import httpx

from server.worker import READ_TIMEOUT_SECONDS
from tests.conftest import Relay, RelayFactory, wait_for

SLOW_CLIENTS = 50
TRICKLE_SECONDS = 3.0


def open_slow(relay: Relay, index: int) -> socket.socket:
    """Half send their headers a line at a time and never finish; half declare a body and send little."""
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    head = "POST /api/event/cmp_test HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://www.example.com\r\n"
    if index % 2:
        head += 'Content-Type: text/plain\r\nContent-Length: 400\r\n\r\n{"event_id":'
    sock.sendall(head.encode())
    return sock


def trickle(sock: socket.socket, index: int) -> None:
    try:
        sock.sendall(b" " if index % 2 else b"X-Slow: 1\r\n")
    except OSError:
        pass  # already cut off by the relay


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 408")


def test_legitimate_requests_are_answered_while_50_slow_clients_trickle(relay_factory: RelayFactory) -> None:
    # 4 threads allow at most 2 inline attempts (serve refuses more).
    relay = relay_factory(workers=1, start=False, inline_concurrency=2)
    relay.args += ["--threads", "4"]
    relay.start()
    slow = [open_slow(relay, i) for i in range(SLOW_CLIENTS)]
    answered = 0
    try:
        with httpx.Client(timeout=5) as client:
            stop = time.monotonic() + TRICKLE_SECONDS
            while time.monotonic() < stop:
                for i, sock in enumerate(slow):
                    trickle(sock, i)
                answer = client.post(
                    f"{relay.url}/api/event/cmp_test",
                    headers={"Origin": "https://www.example.com"},
                    json={"event_id": "quote_viewed", "transaction_id": f"legit-{answered}"},
                )
                assert answer.status_code in (200, 202), answer.text
                answered += 1
        assert answered >= 3
        # Each slow client is cut off once its read deadline passes (408 for a started request).
        wait_for(
            lambda: all(closed_by_server(s) for s in slow),
            timeout=READ_TIMEOUT_SECONDS + 15,
            interval=0.2,
            message="the relay to close every slow connection",
        )
    finally:
        for sock in slow:
            sock.close()
