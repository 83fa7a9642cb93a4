"""Load generators: ``wrk`` at fixed concurrency (closed loop) or at a fixed rate (open loop), and
parsing of its ``done()`` summary. Each run also reports wrk's own CPU time, to show the load
generator is not what limits a figure (it shares the two cores with what it measures)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .servers import boost_priority

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
    accepted: int = 0  # answers below 400 (200 forwarded, 202 stored)
    wrk_cpu_seconds: float = 0.0  # user + system CPU wrk itself used

    @property
    def wrk_cpu_percent(self) -> float:
        """wrk's CPU as a share of one core over the run (200 % = both cores of this machine)."""
        return round(100 * self.wrk_cpu_seconds / self.seconds, 1) if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "wrk_cpu_percent": self.wrk_cpu_percent}


def parse_wrk(stdout: str, concurrency: int, wrk_cpu_seconds: float = 0.0) -> LoadResult:
    """The ``WRK_JSON`` line printed by post_event.lua's ``done()``."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")
    data = json.loads(line[len("WRK_JSON ") :])
    seconds = data["duration_us"] / 1e6
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        concurrency=concurrency,
        requests=data["requests"],
        seconds=round(seconds, 2),
        rps=round(data["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=data["p50"] / 1000,
        p95_ms=data["p95"] / 1000,
        p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000,
        errors=errors,
        accepted=data["requests"] - data["status"],
        wrk_cpu_seconds=round(wrk_cpu_seconds, 2),
    )


def run_wrk(
    base_url: str,
    path: str,
    *,
    concurrency: int,
    seconds: float,
    origin: str,
    threads: int = 2,
    rate: float = 0,
    conversion: str = "",
) -> LoadResult:
    """``wrk`` with ``concurrency`` keep-alive connections for ``seconds``, posting unique events.

    ``rate`` > 0 paces the whole run at that many requests/s, open loop: see :func:`run_paced`.
    """
    threads = max(1, min(threads, concurrency))
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(concurrency),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        base_url,
        "--",
        secrets.token_hex(4),
        path,
        origin,
        f"{rate / threads:g}",
        conversion,
    ]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # At a higher priority, like the fake upstreams: it stands for browsers on other machines.
        proc = subprocess.Popen(
            argv, stdout=out, stderr=err, start_new_session=True, preexec_fn=boost_priority
        )
        # wait4 rather than wait: it also returns the child's own CPU time.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stderr[-2000:]}")
    return parse_wrk(stdout, concurrency, usage.ru_utime + usage.ru_stime)


def run_paced(
    base_url: str,
    path: str,
    *,
    rate: float,
    seconds: float,
    origin: str,
    connections: int = 100,
    conversion: str = "",
) -> LoadResult:
    """About ``rate`` requests/s offered for ``seconds``, whatever the answers' latency (open loop).

    Each wrk thread starts its requests ``threads / rate`` apart on a clock (post_event.lua's
    ``delay()``; Debian has no wrk2); a slow server keeps more of the ``connections`` busy instead
    of lowering the offered rate, until all are busy. wrk, not a Python generator: a Python client
    at 1,000 requests/s needs a good part of a core on the same two cores. ``conversion``: that
    conversion event (with an amount) instead of ``quote_viewed``.
    """
    return run_wrk(
        base_url,
        path,
        concurrency=connections,
        seconds=seconds,
        origin=origin,
        rate=rate,
        conversion=conversion,
    )
