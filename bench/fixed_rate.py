"""An open-loop load generator: events at a fixed rate, latency measured from the scheduled send time.

wrk keeps a fixed number of requests in flight (closed loop), which hides queueing: a slow answer
delays the next request instead of piling requests up. Here request ``i`` is due at ``t0 + i/rate``
whatever happened before, and its latency counts from that moment (no coordinated omission).
Debian has no wrk2, so this runs as its own process (``python -m bench.fixed_rate``) and prints one
JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from typing import Any

import httpx


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (``q`` in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def run(url: str, origin: str, rate: float, seconds: float, grace: float = 10.0) -> dict[str, Any]:
    """Post ``rate * seconds`` unique events on schedule; latencies in ms from the scheduled time."""
    prefix = secrets.token_hex(4)
    headers = {"Content-Type": "text/plain;charset=UTF-8", "Origin": origin}
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)

    async with httpx.AsyncClient(limits=limits, timeout=grace) as client:
        async def send(i: int, due: float) -> None:
            nonlocal errors
            ident = f"{prefix}f{i}"
            body = (f'{{"event_id":"quote_viewed","transaction_id":"t{ident}","event_uuid":"u{ident}",'
                    f'"pid":"src_bench","sub1":"ad42","utm_source":"google"}}')
            try:
                response = await client.post(url, content=body, headers=headers)
                ok = response.status_code < 300
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - due) * 1000)
            else:
                errors += 1

        total = int(rate * seconds)
        t0 = time.perf_counter() + 0.05
        tasks = []
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i, due)))
        # Bounded: a relay that cannot keep up must not keep the suite waiting; what has not
        # finished ``grace`` seconds after the last send counts as an error.
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        errors += len(late)
        elapsed = time.perf_counter() - t0
    return {
        "rate": rate, "sent": total, "ok": len(latencies), "errors": errors,
        "achieved_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2), "p95_ms": round(percentile(latencies, 95), 2),
        "p99_ms": round(percentile(latencies, 99), 2), "max_ms": round(max(latencies, default=0.0), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--origin", required=True)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print("FIXED_RATE_JSON " + json.dumps(asyncio.run(run(args.url, args.origin, args.rate, args.seconds))))


if __name__ == "__main__":
    main()
