"""A lean fake Pingtree: answers every event ``latency_ms`` after receiving it, and counts.

The benchmark must measure the relay, not its upstream: the sandbox checks rules and records every
request, which costs CPU on the same two cores. This one only parses the JSON (to count each
event once), holds the answer on an event-loop timer and sends Pingtree's success body. It counts
what the relay did to it: requests received, distinct events, repeats, answers in flight now and
at most. Its HTTP layer is the sandbox's (server/sandbox/http11.py).

    python -m bench.fake_upstream --port P [--latency-ms 300]

``GET /_upstream/stats`` -> the counters; ``POST /_upstream/config {"latency_ms": N}``;
``POST /_upstream/reset`` zeroes the counters; ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

from server.errors import answer
from server.listening import write_port_file
from server.sandbox.http11 import HttpServer, Request, Respond, Response

SUCCESS = "Event triggered successfully"
_JSON = [("content-type", "application/json")]


@dataclass
class Counts:
    """What the upstream saw since the last reset."""

    received: int = 0  # event requests
    unique: int = 0  # distinct (cid, transaction_id, event_id)
    repeats: int = 0  # requests for an event already received (retries, or doubles)
    answered: int = 0
    in_flight: int = 0  # received, answer not sent yet
    peak_in_flight: int = 0
    bad: int = 0  # bodies that were not a JSON object
    first_at: float = 0.0  # monotonic time of the first / latest event request
    last_at: float = 0.0


class FakeUpstream:
    """The request handler and its counters; ``latency_ms`` can change while it runs."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms
        self.counts = Counts()
        self._seen: set[tuple[str, str, str]] = set()

    def reset(self) -> None:
        self.counts = Counts()
        self._seen = set()

    def stats(self) -> dict[str, Any]:
        return {**asdict(self.counts), "latency_ms": self.latency_ms}

    def __call__(self, request: Request, respond: Respond) -> None:
        if request.method == "POST" and request.path.startswith("/api/event/"):
            self._event(request, respond)
        else:
            respond(self._control(request))

    def _event(self, request: Request, respond: Respond) -> None:
        c = self.counts
        c.received += 1
        c.last_at = time.monotonic()
        c.first_at = c.first_at or c.last_at
        body = self._count(request)
        c.in_flight += 1
        c.peak_in_flight = max(c.peak_in_flight, c.in_flight)
        counts = c  # a reset meanwhile must not make the new counters go negative

        def send() -> None:
            counts.in_flight -= 1
            counts.answered += 1
            respond(Response(200, json.dumps(body, separators=(",", ":")).encode(), list(_JSON)))

        if self.latency_ms > 0:
            asyncio.get_running_loop().call_later(self.latency_ms / 1000, send)
        else:
            send()

    def _count(self, request: Request) -> dict[str, Any]:
        """Count the event once per (cid, transaction_id, event_id); Pingtree's success answer for it."""
        cid = request.path.rsplit("/", 1)[1]
        try:
            event = json.loads(request.body)
            key = (str(event.get("cid", cid)), str(event["transaction_id"]), str(event["event_id"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.counts.bad += 1
            return answer(200, SUCCESS)
        if key in self._seen:
            self.counts.repeats += 1
        else:
            self._seen.add(key)
            self.counts.unique += 1
        return answer(
            200,
            SUCCESS,
            data={
                "cid": key[0],
                "pid": str(event.get("pid") or "organic"),
                "transaction_id": key[1],
                "conversion_id": "",
                "conversion": False,
            },
        )

    def _control(self, request: Request) -> Response:
        route = (request.method, request.path)
        if route == ("GET", "/healthz"):
            return _json(200, {"status": "ok"})
        if route == ("GET", "/_upstream/stats"):
            return _json(200, self.stats())
        if route == ("POST", "/_upstream/reset"):
            self.reset()
            return _json(200, self.stats())
        if route == ("POST", "/_upstream/config"):
            try:
                latency = float(json.loads(request.body)["latency_ms"])
            except (ValueError, KeyError, TypeError):
                return _json(400, answer(400, 'Invalid config: give {"latency_ms": N}'))
            self.latency_ms = max(0.0, latency)
            return _json(200, self.stats())
        return _json(404, answer(404, "Not Found"))


def _json(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body).encode(), list(_JSON))


async def serve(host: str, port: int, latency_ms: float, port_file: str | None = None) -> None:
    server = HttpServer(FakeUpstream(latency_ms))
    bound = await server.start(host, port)
    if port_file:
        write_port_file(port_file, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown(2.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-file", help="once listening, write the port here (with --port 0)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.latency_ms, args.port_file))


if __name__ == "__main__":
    main()
