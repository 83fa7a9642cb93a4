"""Load generators: ``wrk`` at fixed concurrency (closed loop) and parsing of its ``done()`` summary."""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LUA = Path(__file__).resolve().parent / "lua" / "post_event.lua"


@dataclass(frozen=True)
class LoadResult:
    """One load run: throughput, latency percentiles (ms) and errors."""

    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # connect/read/write/timeout errors plus non-2xx/3xx answers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_wrk(stdout: str, concurrency: int) -> LoadResult:
    """The ``WRK_JSON`` line printed by post_event.lua's ``done()``."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")
    data = json.loads(line[len("WRK_JSON "):])
    seconds = data["duration_us"] / 1e6
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        concurrency=concurrency, requests=data["requests"], seconds=round(seconds, 2),
        rps=round(data["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=data["p50"] / 1000, p95_ms=data["p95"] / 1000, p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000, errors=errors,
    )


def run_wrk(base_url: str, path: str, *, concurrency: int, seconds: float, origin: str,
            threads: int = 2, pause_ms: float = 0) -> LoadResult:
    """``wrk`` with ``concurrency`` keep-alive connections for ``seconds``, posting unique events.

    ``pause_ms`` paces every connection (a pause after each answer): see :func:`run_paced`.
    """
    threads = max(1, min(threads, concurrency))
    argv = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "10s",
            "-s", str(LUA), base_url, "--", secrets.token_hex(4), path, origin, f"{pause_ms:g}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    return parse_wrk(done.stdout, concurrency)


def run_paced(base_url: str, path: str, *, rate: float, seconds: float, origin: str,
              connections: int = 50) -> LoadResult:
    """About ``rate`` requests/s: ``connections`` connections, each pausing after every answer.

    Latency is each request's own (send to answer); a server slower than the offered rate lowers the
    achieved rate instead of queueing (closed loop), so read ``rps`` next to the percentiles. wrk, not a
    Python generator: a Python client at 500 requests/s needs a good part of a core on the same two
    cores, and an asyncio + httpx one could not sustain that rate even against the bare baseline.
    """
    return run_wrk(base_url, path, concurrency=connections, seconds=seconds, origin=origin,
                   pause_ms=connections * 1000 / rate)
