"""Run the whole suite: ``python -m bench [--quick]``. Writes docs/benchmarks.md and docs/img/benchmarks.png.

Each part catches its own failure and reports "n/a (why)", so one broken part never hides the rest.
Raw results and server logs go to bench/results/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from server.config import RelayConfig

from . import drain, e2e, load, machine, report, sdk_weight, servers

ROOT = servers.ROOT
CONCURRENCY = (1, 8, 32, 64)
PATH = f"/api/event/{servers.CID}"


def guarded(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"error": reason}`` when it fails (printed, and named in the report)."""
    print(f"[bench] {name} ...", flush=True)
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a broken part must not hide the other figures
        print(f"[bench] {name} failed: {exc!r}", flush=True)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    print(f"[bench] {name} done in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def sdk_part(workdir: Path) -> dict[str, Any]:
    weights = sdk_weight.weights()
    page = guarded("sdk page load (Chromium)", lambda: sdk_weight.page_load(workdir))
    return sdk_weight.to_dict(weights, None if isinstance(page, dict) else page) | (
        {"page": page} if isinstance(page, dict) else {})


def sweep(url: str, seconds: float) -> list[dict[str, Any]]:
    return [load.run_wrk(url, PATH, concurrency=c, seconds=seconds, origin=servers.ORIGIN).to_dict()
            for c in CONCURRENCY]


def fixed_rate(url: str, rate: float, seconds: float) -> dict[str, Any]:
    result = load.run_paced(url, PATH, rate=rate, seconds=seconds, origin=servers.ORIGIN)
    return {"rate": rate, **result.to_dict()}


def worker_rss(server: servers.Server) -> list[float]:
    return [round(servers.peak_rss_mb(pid), 1) for pid in server.worker_pids()]


def accept_part(workdir: Path, seconds: float, results: dict[str, Any]) -> dict[str, Any]:
    """e2e, fixed rate and the concurrency sweep against a fast sandbox, then against a 300 ms one."""
    out: dict[str, Any] = {}
    with servers.sandbox(workdir) as sandbox, servers.baseline(workdir) as base:
        with servers.relay(workdir, sandbox.url, f"sqlite:///{workdir / 'accept.sqlite3'}") as relay:
            load.run_wrk(relay.url, PATH, concurrency=8, seconds=2, origin=servers.ORIGIN)  # warm-up
            load.run_wrk(base.url, PATH, concurrency=8, seconds=2, origin=servers.ORIGIN)
            results["e2e"] = guarded("end to end", lambda: e2e.measure(
                relay.url, sandbox.url, servers.CID, servers.ORIGIN, requests=300 if seconds > 2 else 50).to_dict())
            out["fixed_rate"] = guarded("fixed rate 500 ev/s", lambda: fixed_rate(relay.url, 500, max(seconds * 2, 2)))
            out["relay"] = sweep(relay.url, seconds)
            results["memory"]["steady load (after the sweep), SQLite"] = worker_rss(relay)
        out["baseline"] = sweep(base.url, seconds)
        httpx.post(sandbox.url + "/_sandbox/reset", timeout=5).raise_for_status()
        httpx.post(sandbox.url + "/_sandbox/faults", json={"delay_ms": 300, "when": "before"},
                   timeout=5).raise_for_status()
        with servers.relay(workdir, sandbox.url, f"sqlite:///{workdir / 'slow.sqlite3'}", name="relay-slow") as slow:
            load.run_wrk(slow.url, PATH, concurrency=8, seconds=2, origin=servers.ORIGIN)
            out["relay_slow"] = sweep(slow.url, seconds)
            results["memory"]["steady load, 300 ms upstream (backlog growing)"] = worker_rss(slow)
    return out


def drain_part(workdir: Path, events: int, limit: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sqlite_url = f"sqlite:///{workdir / 'drain.sqlite3'}"
    rows.append(guarded("drain SQLite", lambda: drain.run(workdir, sqlite_url, "SQLite", events, limit).to_dict()))
    rows[-1].setdefault("store", "SQLite")

    def redis_drain() -> dict[str, Any]:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server not installed")
        with servers.redis_server(workdir) as redis:
            return drain.run(workdir, f"redis://127.0.0.1:{redis.port}/0", "Redis", events, limit).to_dict()

    rows.append(guarded("drain Redis", redis_drain))
    rows[-1].setdefault("store", "Redis")
    for row in rows:
        row["limit"] = limit
    return rows


def targets(results: dict[str, Any]) -> list[report.Target]:
    T = report.Target
    sdk = results.get("sdk") or {}
    weights = {w["campaign"]: w for w in sdk.get("weights", [])}
    sdk_err = sdk.get("error", "")
    accept = results.get("accept") or {}
    ok = "error" not in accept
    best = max(accept["relay"], key=lambda r: r["rps"]) if ok else None
    best_slow = max(accept["relay_slow"], key=lambda r: r["rps"]) if ok else None
    best_base = max(r["rps"] for r in accept["baseline"]) if ok else None
    fixed = accept.get("fixed_rate") if ok and "error" not in accept.get("fixed_rate", {}) else None
    e2e_ = results.get("e2e") if "error" not in (results.get("e2e") or {"error": 1}) else None
    drains = {d["store"]: d for d in results.get("drain", []) if "error" not in d}
    rss = [v for vals in results.get("memory", {}).values() for v in vals]
    return [
        T("SDK gzip, demo campaign", weights.get("cmp_demo", {}).get("gzip"), sdk_weight.DEMO_GZIP_BUDGET, "B",
          True, 1500, sdk_err),
        T("SDK gzip, every feature on", weights.get("cmp_full", {}).get("gzip"), sdk_weight.EVERY_FEATURE_GZIP_BUDGET,
          "B", True, 1500, sdk_err),
        T("accept ev/s, durable write (best concurrency)", best and best["rps"], 1000, "ev/s", False, 2000),
        T("accept / baseline (best of each)", best and round(100 * best["rps"] / best_base, 1), 50, "%", False),
        T("accept ev/s, 300 ms upstream", best_slow and best_slow["rps"], 1000, "ev/s", False, 2000),
        T("accept / baseline, 300 ms upstream", best_slow and round(100 * best_slow["rps"] / best_base, 1), 50, "%", False),
        T("p50 at 500 ev/s", fixed and fixed["p50_ms"], 5, "ms", True),
        T("p99 at 500 ev/s", fixed and fixed["p99_ms"], 25, "ms", True),
        T("relay adds, p50", e2e_ and e2e_["added_p50_ms"], 5, "ms", True),
        *[T(f"drain ev/s, {name}", d["rps"], 1000, "ev/s", False) for name, d in drains.items()],
        T("peak RSS per worker (max seen)", max(rss) if rss else None, 150, "MB", True),
    ]


def settings(seconds: float, events: int, limit: float) -> list[str]:
    d = RelayConfig(upstream_url="http://x")
    return [
        "relay: `pingtree-relay serve` defaults: gunicorn gthread, workers = max(2, min(8, 2 x nproc)), 8 threads; "
        f"inline_concurrency={d.inline_concurrency}, inline_timeout={d.inline_timeout} s, "
        f"max_in_flight={d.max_in_flight} per box, upstream_timeout={d.upstream_timeout} s; "
        "SQLite store in WAL mode, synchronous=NORMAL, on the local disk; upstream = the sandbox "
        "(`pingtree-relay sandbox`: one gthread worker, 64 threads) on the same machine.",
        "rate limits off (`per_ip = \"\"`, `per_campaign = \"\"`): all the load comes from 127.0.0.1.",
        "baseline: bench/baseline.py (Flask, parse JSON, 204) through the same `server.wsgi.run` defaults.",
        f"load: wrk, 2 threads (1 at concurrency 1), keep-alive, {seconds:g} s per point after a 2 s warm-up; "
        "each request a unique quote_viewed event (text/plain, allowed Origin), bench/lua/post_event.lua.",
        "300 ms upstream: sandbox fault `{\"delay_ms\": 300, \"when\": \"before\"}` on every event; fresh relay and store.",
        "fixed rate: wrk paced by post_event.lua's delay() (50 connections, each pausing 100 ms after every answer: "
        "about 500 ev/s offered; Debian has no wrk2).",
        f"drain: {events:,} events filled through `Store.add`, then a fresh relay (defaults) and sandbox; "
        f"clock from relay start to the sandbox counting them all, capped at {limit:g} s. "
        "Redis: redis-server with appendonly yes, appendfsync everysec.",
        "everything on 127.0.0.1; load generator, relay, sandbox (and Redis) share the same cores.",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, 5,000-event drain (a smoke test)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    seconds, events, limit = (1.0, 5000, 60.0) if args.quick else (5.0, 100_000, 170.0)
    workdir = ROOT / "bench" / "results"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine.describe(),
                               "settings": settings(seconds, events, limit), "memory": {}}
    results["sdk"] = guarded("sdk weight", lambda: sdk_part(workdir))
    results["accept"] = guarded("accept path", lambda: accept_part(workdir, seconds, results))
    results["drain"] = drain_part(workdir, events, limit)
    for row in results["drain"]:
        if "peak_rss_mb" in row:
            results["memory"][f"draining the {events:,}-event backlog, {row['store']}"] = row["peak_rss_mb"]
    results["seconds"] = time.perf_counter() - started
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    out = Path(args.out)
    chart_path = out.parent / "img" / "benchmarks.png"
    chart_ref = None
    if "error" not in results["accept"]:
        report.chart(chart_path, results["accept"])
        chart_ref = "img/benchmarks.png"
    report.write_markdown(out, results, targets(results), chart_ref)
    print(f"[bench] wrote {out} and {chart_path} in {results['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
