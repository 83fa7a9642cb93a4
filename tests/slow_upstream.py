"""A lean Pingtree stand-in on loopback that holds each answer and counts what it sees.

``python -m tests.slow_upstream --port P [--delay-ms D]`` serves ``POST /api/event/{cid}``: it
answers ``200`` with a ``conversion_id`` ``D`` ms after reading the request, on asyncio (one thread),
so thousands of held answers cost almost nothing and the tests measure the relay, not the upstream.
It counts requests in flight (and the peak), requests per ``transaction_id``, and events it
*counted* per transaction_id: like Pingtree, a second event of one ``(cid, transaction_id,
event_id)`` is answered ``400 Duplicate event for this transaction_id`` and not counted, so a
resend after a lost answer shows as a request, never as a double count. Control: ``GET /_stats``, ``POST /_config`` ``{"delay_ms": D}``,
``POST /_reset``. HTTP/1.1 with keep-alive, hand-parsed: only what httpx sends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections import Counter
from typing import Any

from server.listening import write_port_file


class Upstream:
    def __init__(self, delay_ms: float) -> None:
        self.delay = delay_ms / 1000.0
        self.reset()

    def reset(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.requests = 0
        self.by_txn: Counter[str] = Counter()  # requests
        self.counted: Counter[str] = Counter()  # events counted (first of their key)
        self._keys: set[tuple[str, str, str]] = set()

    def stats(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "peak": self.peak,
            "requests": self.requests,
            "by_txn": dict(self.by_txn),
            "counted": dict(self.counted),
            "delay_ms": self.delay * 1000,
        }

    async def event(self, cid: str, body: bytes) -> tuple[int, dict[str, Any]]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.requests += 1
        try:
            data = json.loads(body or b"{}")
            txn = str(data.get("transaction_id"))
            self.by_txn[txn] += 1
            key = (cid, txn, str(data.get("event_id")))
            duplicate = key in self._keys
            if not duplicate:  # counted on arrival, as Pingtree does, whether or not the answer gets back
                self._keys.add(key)
                self.counted[txn] += 1
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if duplicate:
            return 400, {"status": 400, "message": "Duplicate event for this transaction_id"}
        return 200, {
            "status": 200,
            "message": "Event triggered successfully",
            "data": {"conversion_id": uuid.uuid4().hex},
        }

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path.startswith("/api/event/"):
            return await self.event(path[len("/api/event/") :], body)
        if path == "/_stats":
            return 200, self.stats()
        if method == "POST" and path == "/_config":
            self.delay = float(json.loads(body)["delay_ms"]) / 1000.0
            return 200, self.stats()
        if method == "POST" and path == "/_reset":
            self.reset()
            return 200, {}
        if path == "/healthz":
            return 200, {"status": "ok"}
        return 404, {"status": 404, "message": "Not found"}

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, answer = await self.handle(method, path, body)
                payload = json.dumps(answer).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def serve(port: int, delay_ms: float, port_file: str | None = None) -> None:
    upstream = Upstream(delay_ms)
    server = await asyncio.start_server(upstream.connection, "127.0.0.1", port, backlog=4096)
    if port_file:  # --port 0: whoever started it learns the port the kernel picked
        write_port_file(port_file, int(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--port-file", help="once listening, write the port here")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms, args.port_file))


if __name__ == "__main__":
    main()
