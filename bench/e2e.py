"""End to end: browser-style request -> relay -> sandbox, against posting straight to the sandbox.

Sequential requests (one in flight), alternating relay and direct, so both see the same machine
state. The events are conversions, which the relay tries inline (it answers a plain event 202
without waiting for the upstream): it answers 200 only after its inline attempt reached the
upstream, so the difference of the two is exactly what the relay adds (validation, enrichment, the
durable writes, one hop).

Paced as pages send conversions (``PACE_SECONDS`` apart), not back to back: a client posting as
fast as it can keeps a worker busy enough that the relay (rightly) skips its inline attempts and
answers 202, and the figure then compared a 202 with the upstream's answer (178 and 181 of 300 in
the two runs before the pacing).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

PACE_SECONDS = 0.02  # between the starts of two pairs of posts: 50 conversions/s, an idle relay


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (``q`` in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class EndToEnd:
    requests: int
    relay_p50_ms: float
    relay_p95_ms: float
    direct_p50_ms: float
    direct_p95_ms: float
    relay_non_200: int  # answers that were not a 200 with the sandbox's answer (e.g. 202 queued)

    @property
    def added_p50_ms(self) -> float:
        return round(self.relay_p50_ms - self.direct_p50_ms, 2)

    @property
    def added_p95_ms(self) -> float:
        return round(self.relay_p95_ms - self.direct_p95_ms, 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "added_p50_ms": self.added_p50_ms,
            "added_p95_ms": self.added_p95_ms,
            "pace_ms": PACE_SECONDS * 1000,
        }


def _body(ident: str, *, with_uuid: bool) -> str:
    uuid = f'"event_uuid":"u{ident}",' if with_uuid else ""
    return (
        f'{{"event_id":"sale_completed","amount":45,"transaction_id":"t{ident}",{uuid}'
        f'"pid":"src_bench","sub1":"ad42","utm_source":"google"}}'
    )


def measure(relay_url: str, sandbox_url: str, cid: str, origin: str, requests: int = 400) -> EndToEnd:
    """``requests`` sequential posts to each side (after 20 warm-up posts each), ``PACE_SECONDS`` apart."""
    prefix = secrets.token_hex(4)
    next_start = time.perf_counter()
    headers = {"Content-Type": "text/plain;charset=UTF-8", "Origin": origin}
    relay_ms: list[float] = []
    direct_ms: list[float] = []
    non_200 = 0
    with httpx.Client(timeout=10) as client:
        for i in range(-20, requests):
            time.sleep(max(0.0, next_start - time.perf_counter()))
            next_start += PACE_SECONDS
            start = time.perf_counter()
            r = client.post(
                f"{relay_url}/api/event/{cid}",
                content=_body(f"{prefix}r{i}", with_uuid=True),
                headers=headers,
            )
            relay_time = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            d = client.post(
                f"{sandbox_url}/api/event/{cid}",
                content=_body(f"{prefix}d{i}", with_uuid=False),
                headers={"Content-Type": "application/json"},
            )
            direct_time = (time.perf_counter() - start) * 1000
            if i < 0:
                continue
            d.raise_for_status()
            non_200 += r.status_code != 200
            relay_ms.append(relay_time)
            direct_ms.append(direct_time)
    return EndToEnd(
        requests=requests,
        relay_non_200=non_200,
        relay_p50_ms=round(percentile(relay_ms, 50), 2),
        relay_p95_ms=round(percentile(relay_ms, 95), 2),
        direct_p50_ms=round(percentile(direct_ms, 50), 2),
        direct_p95_ms=round(percentile(direct_ms, 95), 2),
    )
