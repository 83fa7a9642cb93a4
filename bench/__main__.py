"""Run the whole suite: ``python -m bench [--quick] [--before FILE]``. Writes docs/benchmarks.md and
docs/img/benchmarks.png.

Each part catches its own failure and reports "n/a (why)", so one broken part never hides the rest.
Raw results, profiles and server logs go to bench/results/ (not committed). ``--before`` names the
results.json of an earlier run whose headline figures are shown next to this run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from server.config import RelayConfig

from . import drain, e2e, load, machine, profile, report, sdk_weight, servers, sustained

ROOT = servers.ROOT
CONCURRENCY = (1, 8, 32, 64)
PATH = f"/api/event/{servers.CID}"
LATENCIES = (0, 50, 300)
SUSTAINED_TRIALS = 3  # per latency: the median is reported, every trial listed


def guarded(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"error": reason}`` when it fails (printed, and named in the report)."""
    print(f"[bench] {name} ... (load average {os.getloadavg()[0]:.1f})", flush=True)
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
        {"page": page} if isinstance(page, dict) else {}
    )


def measured(server: servers.Server, fn: Callable[[], load.LoadResult]) -> dict[str, Any]:
    """``fn()``'s load result plus the CPU ``server`` used meanwhile, per accepted event."""
    before = servers.cpu_seconds(server)
    result = fn()
    cpu = servers.cpu_seconds(server) - before
    per_event = round(1000 * cpu / result.accepted, 3) if result.accepted else None
    return {
        **result.to_dict(),
        "server_cpu_ms_per_event": per_event,
        "server_cpu_percent": round(100 * cpu / result.seconds, 1) if result.seconds else 0.0,
    }


def sweep(server: servers.Server, seconds: float) -> list[dict[str, Any]]:
    return [
        measured(
            server,
            lambda c=c: load.run_wrk(server.url, PATH, concurrency=c, seconds=seconds, origin=servers.ORIGIN),
        )
        for c in CONCURRENCY
    ]


def fixed_rate(relay: servers.Server, seconds: float, conversion: str = "") -> dict[str, Any]:
    """About 500 ev/s offered open loop to ``relay`` (``conversion``: of that conversion event)."""
    return {
        "rate": 500,
        **measured(
            relay,
            lambda: load.run_paced(
                relay.url,
                PATH,
                rate=500,
                seconds=max(seconds * 2, 2),
                origin=servers.ORIGIN,
                conversion=conversion,
            ),
        ),
    }


def warm(server: servers.Server) -> None:
    load.run_wrk(server.url, PATH, concurrency=8, seconds=2, origin=servers.ORIGIN)


def worker_rss(server: servers.Server) -> list[float]:
    return [round(servers.peak_rss_mb(pid), 1) for pid in server.worker_pids()]


def profiled_load(server: servers.Server, workdir: Path, label: str, seconds: float) -> dict[str, Any]:
    """py-spy on every worker of ``server`` during ``seconds`` of wrk at 32 connections (not a measured point)."""
    procs = profile.start_record(server.worker_pids(), seconds, workdir / "profiles", label)
    time.sleep(0.5)  # py-spy attached before the load starts
    result = load.run_wrk(server.url, PATH, concurrency=32, seconds=seconds, origin=servers.ORIGIN)
    return {
        "load": f"wrk, 32 connections, {result.rps:,.0f} ev/s",
        **profile.finish(procs, workdir / "profiles", label, seconds),
    }


def accept_part(workdir: Path, seconds: float, results: dict[str, Any], profiles: bool) -> dict[str, Any]:
    """Relay, naive proxy and bare Flask against a fast upstream; then the relay with it slow and down."""
    out: dict[str, Any] = {}
    with (
        servers.fake_upstream(workdir, 0, name="upstream-fast") as fast,
        servers.baseline(workdir) as bare,
        servers.naive_proxy(workdir, fast.url) as proxy,
    ):
        with servers.relay(workdir, fast.url, f"sqlite:///{workdir / 'accept.sqlite3'}") as relay:
            for server in (relay, proxy, bare):
                warm(server)
            results["e2e"] = guarded(
                "end to end",
                lambda: e2e.measure(
                    relay.url, fast.url, servers.CID, servers.ORIGIN, requests=300 if seconds > 2 else 50
                ).to_dict(),
            )
            # Plain events, then the same rate of conversions: each of those is tried inline (the
            # plain ones are not), so it is what a page waiting for its conversion_id sees.
            for key, what, conversion in (
                ("fixed_rate", "fixed rate 500 ev/s", ""),
                ("fixed_rate_conversions", "fixed rate 500 ev/s, conversions", "sale_completed"),
            ):
                out[key] = guarded(what, lambda conversion=conversion: fixed_rate(relay, seconds, conversion))
            out["relay"] = sweep(relay, seconds)
            results["memory"]["accept path, fast upstream (after the sweep), SQLite"] = worker_rss(relay)
            if profiles:
                results["profiles"]["accept path, fast upstream"] = guarded(
                    "profile: accept, fast upstream", lambda: profiled_load(relay, workdir, "accept-fast", 8)
                )
        out["proxy"] = sweep(proxy, seconds)
        out["baseline"] = sweep(bare, seconds)
        out["upstream_fast"] = servers.upstream_stats(fast)
        with servers.fake_upstream(workdir, 300, name="upstream-slow") as slow_up:
            with servers.relay(
                workdir, slow_up.url, f"sqlite:///{workdir / 'slow.sqlite3'}", name="relay-slow"
            ) as slow:
                warm(slow)
                out["relay_slow"] = sweep(slow, seconds)
                results["memory"]["accept path, 300 ms upstream (backlog growing)"] = worker_rss(slow)
            with servers.relay(  # the same, with a decision line for every event (what they cost)
                workdir,
                slow_up.url,
                f"sqlite:///{workdir / 'slow-every-line.sqlite3'}",
                name="relay-slow-every-line",
                decision_log_limit=0,
            ) as every_line:
                warm(every_line)
                out["relay_slow_every_line"] = sweep(every_line, seconds)
        # Bare Flask again, each relay stopped meanwhile: report.BARE_BRACKETS.
        out["baseline_after_slow"] = sweep(bare, seconds)
        down = f"http://127.0.0.1:{servers.free_port()}"  # nobody listens: every attempt is refused
        with servers.relay(workdir, down, f"sqlite:///{workdir / 'down.sqlite3'}", name="relay-down") as dead:
            warm(dead)
            out["relay_down"] = sweep(dead, seconds)
        out["baseline_after_down"] = sweep(bare, seconds)
    return out


def sustained_part(
    workdir: Path, seconds: float, cap: float, results: dict[str, Any], profiles: bool
) -> list[dict[str, Any]]:
    """Each latency SUSTAINED_TRIALS times, the latencies taking turns (so that the host's drift,
    10 % within minutes here, falls on all three alike); each latency's row is its median trial by
    delivered events/s, with every trial's figure kept beside it (``trials``)."""
    trials: dict[float, list[dict[str, Any]]] = {latency: [] for latency in LATENCIES}
    for trial in range(SUSTAINED_TRIALS):
        for latency in LATENCIES:
            trials[latency].append(
                guarded(
                    f"sustained delivery, {latency} ms upstream, trial {trial + 1} of {SUSTAINED_TRIALS}",
                    lambda latency=latency, trial=trial: sustained.run(
                        workdir,
                        f"sqlite:///{workdir / f'sustained-{latency}-{trial}.sqlite3'}",
                        "SQLite",
                        latency,
                        rate=1000,
                        seconds=seconds,
                        empty_cap=cap,
                    ).to_dict(),
                )
            )
    rows = []
    for latency, runs in trials.items():
        row = sustained.median_trial(runs)
        row.setdefault("latency_ms", latency)
        rows.append(row)
        if "peak_rss_mb" in row:
            results["memory"][
                f"sustained 1,000 ev/s, {latency} ms upstream (peak in flight {row['peak_in_flight']})"
            ] = row["peak_rss_mb"]
    if profiles:
        # A run of its own, not a measured point: py-spy takes CPU from the relay on the same two
        # cores, so the run it profiles must not be the one whose figures are reported.
        guarded(
            "profile: sustained delivery, 300 ms upstream",
            lambda: sustained.run(
                workdir,
                f"sqlite:///{workdir / 'sustained-profiled.sqlite3'}",
                "SQLite",
                300,
                rate=1000,
                seconds=min(seconds, 10),
                empty_cap=cap,
                during_load=_profile_hook(workdir, results, min(seconds, 10)),
            ).to_dict(),
        )
    return rows


def _profile_hook(workdir: Path, results: dict[str, Any], seconds: float) -> Callable[[servers.Server], None]:
    """Profile the relay's workers in the middle of the load, and take one dump of the busiest moment."""

    def hook(relay: servers.Server) -> None:
        time.sleep(min(3.0, seconds / 4))
        length = max(2.0, min(8.0, seconds / 2))
        label = "sustained-300"
        procs = profile.start_record(relay.worker_pids(), length, workdir / "profiles", label)
        time.sleep(length / 2)
        dumps = {str(pid): profile.dump(pid) for pid in relay.worker_pids()[:2]}
        summary = profile.finish(procs, workdir / "profiles", label, length)
        results["profiles"]["sustained 1,000 ev/s, 300 ms upstream"] = {
            "load": "wrk paced at 1,000 ev/s",
            **summary,
            "dumps": dumps,
        }

    return hook


def sandbox_part(workdir: Path, seconds: float) -> dict[str, Any]:
    """The sandbox itself, with every answer held 300 ms: 1,500 ev/s offered straight to it, open loop."""
    with servers.sandbox(workdir) as sandbox:
        httpx.post(
            sandbox.url + "/_sandbox/faults", json={"delay_ms": 300, "when": "before"}, timeout=10
        ).raise_for_status()
        peak = {"held": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                held = httpx.get(sandbox.url + "/_sandbox/stats", timeout=10).json()["held"]
                peak["held"] = max(peak["held"], held)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        row = measured(
            sandbox,
            lambda: load.run_paced(
                sandbox.url, PATH, rate=1500, seconds=seconds, origin=servers.ORIGIN, connections=1000
            ),
        )
        stop.set()
        sampler.join()
        stats = httpx.get(sandbox.url + "/_sandbox/stats", timeout=10).json()
    return {**row, "rate": 1500, "peak_held": peak["held"], "accepted_by_sandbox": stats["accepted"]}


def drain_part(workdir: Path, events: int, limits: dict[str, float]) -> list[dict[str, Any]]:
    cfg = servers.write_config(
        workdir / "records.toml", upstream="http://127.0.0.1:1", store="sqlite:///unused"
    )
    records = drain.make_records(cfg, events)
    template, fill_seconds = drain.fill_template(workdir, records)
    rows: list[dict[str, Any]] = []
    for upstream in drain.UPSTREAMS:
        name = f"drain SQLite to {drain.UPSTREAMS[upstream]}"
        rows.append(
            guarded(
                name,
                lambda upstream=upstream: drain.run(
                    workdir,
                    drain.copy_sqlite(template, workdir / f"drain-{upstream}.sqlite3"),
                    "SQLite",
                    records,
                    upstream=upstream,
                    limit_seconds=limits[upstream],
                    fill_seconds=fill_seconds,
                ).to_dict(),
            )
        )
        rows[-1].update(store="SQLite", upstream=upstream)

    redis_template = guarded("fill Redis", lambda: drain.fill_redis_template(workdir, records))
    for upstream in drain.UPSTREAMS:

        def redis_drain(upstream: str = upstream) -> dict[str, Any]:
            if "error" in redis_template:
                raise RuntimeError(f"filling Redis failed: {redis_template['error']}")
            data = drain.copy_redis(Path(redis_template["data"]), workdir / f"redis-{upstream}")
            with servers.redis_server(workdir, data) as redis:
                return drain.run(
                    workdir,
                    f"redis://127.0.0.1:{redis.port}/0",
                    "Redis",
                    records,
                    upstream=upstream,
                    limit_seconds=limits[upstream],
                    fill_seconds=redis_template["seconds"],
                ).to_dict()

        rows.append(guarded(f"drain Redis to {drain.UPSTREAMS[upstream]}", redis_drain))
        rows[-1].update(store="Redis", upstream=upstream)
    for row in rows:
        row["limit"] = limits[row["upstream"]]
    return rows


def targets(results: dict[str, Any]) -> list[report.Target]:
    T = report.Target
    sdk = results.get("sdk") or {}
    weights = {w["campaign"]: w for w in sdk.get("weights", [])}
    sdk_err = sdk.get("error", "")
    accept = results.get("accept") or {}
    ok = "error" not in accept
    best = report.best_rps(accept, "relay") if ok else None
    ratio = (lambda a, b: report.ratio(accept, a, b)) if ok else (lambda a, b: None)
    bare_ratio = (lambda key: report.bare_ratio(accept, key)) if ok else (lambda key: None)
    fixed = accept.get("fixed_rate") if ok and "error" not in accept.get("fixed_rate", {}) else None
    e2e_ = results.get("e2e") if "error" not in (results.get("e2e") or {"error": 1}) else None
    sus = {r["latency_ms"]: r for r in results.get("sustained", []) if "error" not in r}
    drains = {(d["store"], d["upstream"]): d for d in results.get("drain", []) if "error" not in d}
    rss = [v for vals in results.get("memory", {}).values() for v in vals]
    full = [v for k, vals in results.get("memory", {}).items() if k.startswith("sustained") for v in vals]
    drain_targets = {"sandbox": 2000, "300ms": 1000}
    return [
        T(
            "SDK gzip, demo campaign",
            weights.get("cmp_demo", {}).get("gzip"),
            sdk_weight.DEMO_GZIP_BUDGET,
            "B",
            True,
            1500,
            sdk_err,
        ),
        T(
            "SDK gzip, every feature on",
            weights.get("cmp_full", {}).get("gzip"),
            sdk_weight.EVERY_FEATURE_GZIP_BUDGET,
            "B",
            True,
            1500,
            sdk_err,
        ),
        *[
            T(
                f"sustained delivery ev/s at 1,000 offered, {lat} ms upstream",
                sus.get(lat, {}).get("delivered_rate"),
                sustained.delivery_target(sus.get(lat, {}), 1000),
                "ev/s",
                False,
            )
            for lat in LATENCIES
        ],
        *[
            T(
                f"backlog at the end of 15 s at 1,000 ev/s, {lat} ms upstream",
                sus.get(lat, {}).get("backlog_end"),
                1000,
                "events",
                True,
            )
            for lat in LATENCIES
        ],
        T("accept ev/s, durable write (best concurrency)", best, 1000, "ev/s", False, 2000),
        T(
            "accept, fast upstream: relay / naive proxy (best of each)",
            ratio("relay", "proxy"),
            1.0,
            "x",
            False,
        ),
        T("accept, 300 ms upstream: relay / bare Flask", bare_ratio("relay_slow"), 0.5, "x", False),
        T("accept, upstream down: relay / bare Flask", bare_ratio("relay_down"), 0.5, "x", False),
        T("p50 at 500 ev/s", fixed and fixed["p50_ms"], 5, "ms", True),
        T("p99 at 500 ev/s", fixed and fixed["p99_ms"], 25, "ms", True),
        T("relay adds, p50", e2e_ and e2e_["added_p50_ms"], 5, "ms", True),
        *[
            T(
                f"drain ev/s, {store}, {drain.UPSTREAMS[up]}",
                drains.get((store, up), {}).get("rps"),
                drain_targets[up],
                "ev/s",
                False,
            )
            for up in drain.UPSTREAMS
            for store in ("SQLite", "Redis")
        ],
        T(
            "peak RSS per relay process at full in-flight (sustained runs)",
            max(full) if full else None,
            150,
            "MB",
            True,
        ),
        T("peak RSS per relay process (max seen anywhere)", max(rss) if rss else None, 150, "MB", True),
    ]


def settings(seconds: float, sustained_seconds: float, events: int, limits: dict[str, float]) -> list[str]:
    d = RelayConfig(upstream_url="http://x")
    knobs = ", ".join(
        f"{k}={getattr(d, k)}"
        for k in ("inline_concurrency", "inline_timeout", "max_in_flight", "upstream_timeout")
        if hasattr(d, k)
    )
    serve = servers.serve_defaults()
    return [
        f"relay: `pingtree-relay serve` defaults (workers {serve['workers'] or 'by CPU count'}, {serve['threads']} "
        f"threads, event-loop workers); {knobs}; SQLite store in WAL mode on the local disk.",
        "upstream: the lean fake Pingtree (bench/fake_upstream.py: asyncio, answers each event N ms after "
        "receiving it, counts distinct events and answers in flight), except for the drains to the sandbox "
        "(`pingtree-relay sandbox`, every rule checked; one asyncio process). Both on this machine.",
        "baselines, same gunicorn settings as `serve` (read from its parser): bare Flask (bench/baseline.py: "
        "parse JSON, 204) and the naive proxy (bench/naive_proxy.py: parse JSON, one `httpx.post` to the "
        "same upstream, pass the answer back).",
        'rate limits off (`per_ip = ""`, `per_campaign = ""`): all the load comes from 127.0.0.1.',
        f"accept sweep: wrk, 2 threads (1 at concurrency 1), keep-alive, {seconds:g} s per point after a 2 s "
        "warm-up; each request a unique quote_viewed event (text/plain, allowed Origin), bench/lua/post_event.lua. "
        "Upstream slow: the fake answering in 300 ms; down: a port nobody listens on. Bare Flask swept "
        "before the slow relay, between it and the down relay, and after (each relay stopped first): "
        "slow / bare and down / bare are against the mean of the two sweeps either side. After the slow "
        "relay, the same with every decision line written (`decision_log_limit = 0`; the default writes "
        "50 a second per process and level and counts the rest), for what the limit saves.",
        "fixed rate and sustained load: open loop, wrk paced on a clock by post_event.lua's delay() "
        "(Debian has no wrk2): requests start 1/rate apart whatever the answers' latency.",
        f"sustained: 1,000 ev/s offered for {sustained_seconds:g} s; accepted = events in the store after "
        "the load; delivered = distinct events the upstream received during the load; backlog = events pending "
        "in the store (sampled every second); time to empty: load end to the upstream holding every accepted "
        f"event. Each latency {SUSTAINED_TRIALS} times, the latencies taking turns; each row is the median "
        "trial by delivered ev/s, every trial's delivered ev/s in its notes. The delivered target is 1,000 "
        "ev/s, or the accepted rate when that is within "
        f"{sustained.PACING_SLACK:.0%} below it (wrk's run outlasts the load it paces by a few tens of ms: "
        "15,011 events in 15.02 s is 999.4/s, every one of them delivered).",
        f"drain: {events:,} events filled through `Store.add` (SQLite: once, then a copy per drain), then a fresh "
        f"relay (defaults) and upstream; clock from relay start to the upstream holding them all, capped at "
        f"{limits['sandbox']:g} s (sandbox) and {limits['300ms']:g} s (300 ms); a capped run's rate is what it "
        "delivered over the cap. Redis: redis-server with appendonly yes, appendfsync everysec.",
        "CPU: user + system time of each server's processes (/proc), and of wrk (wait4), over each point.",
        f"priority: wrk, the fake upstreams and the sandbox run at nice {servers.BOOST_NICE} (their session's "
        "autogroup too): they stand for browsers and Pingtree, use a few % of a core, and must not be starved by "
        "the machine's other work; the relay, the baselines and redis-server keep the normal priority, each "
        "server in its own session (so each gets one autogroup's share of the machine, whatever its processes).",
        "everything on 127.0.0.1; load generator, relay, upstream (and Redis) share the same two cores, with "
        "other engineers' test runs on the same machine (load average at each part in the run log).",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, 5,000-event drains (a smoke test)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--before", help="results.json of an earlier run, shown next to this one")
    parser.add_argument("--no-profiles", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--from-results", help="measure nothing: rewrite the report from this results.json")
    args = parser.parse_args()
    before = json.loads(Path(args.before).read_text()) if args.before else None
    if args.from_results:
        write_report(Path(args.out), json.loads(Path(args.from_results).read_text()), before)
        return 0
    if args.quick:
        seconds, sustained_seconds, cap, events, limits = (
            1.0,
            3.0,
            15.0,
            5000,
            {"sandbox": 30.0, "300ms": 30.0},
        )
    else:
        seconds, sustained_seconds, cap, events, limits = (
            5.0,
            15.0,
            45.0,
            100_000,
            {"sandbox": 60.0, "300ms": 110.0},
        )
    profiles = not args.no_profiles and not args.quick
    workdir = ROOT / "bench" / "results"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine.describe(),
        "settings": settings(seconds, sustained_seconds, events, limits),
        "memory": {},
        "profiles": {},
        "loadavg": {},
    }

    def part(key: str, name: str, fn: Callable[[], Any]) -> None:
        results["loadavg"][name] = round(os.getloadavg()[0], 1)
        results[key] = guarded(name, fn)

    part("sdk", "sdk weight", lambda: sdk_part(workdir))
    part("accept", "accept path", lambda: accept_part(workdir, seconds, results, profiles))
    part(
        "sustained",
        "sustained delivery",
        lambda: sustained_part(workdir, sustained_seconds, cap, results, profiles),
    )
    part("sandbox", "sandbox capacity", lambda: sandbox_part(workdir, sustained_seconds / 3))
    part("drain", "drain", lambda: drain_part(workdir, events, limits))
    if isinstance(results["drain"], dict):  # the whole part failed (e.g. filling the store)
        results["drain"] = [
            {"store": "SQLite", "upstream": up, **results["drain"], "limit": limits[up]}
            for up in drain.UPSTREAMS
        ]
    for row in results["drain"]:
        if "peak_rss_mb" in row:
            results["memory"][
                f"draining {events:,} events, {row['store']}, to {drain.UPSTREAMS[row['upstream']]}"
            ] = row["peak_rss_mb"]
    results["seconds"] = time.perf_counter() - started
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(Path(args.out), results, before)
    print(
        f"[bench] wrote {args.out} in {results['seconds']:.0f} s (raw: {workdir / 'results.json'})",
        flush=True,
    )
    return 0


def write_report(out: Path, results: dict[str, Any], before: dict[str, Any] | None) -> None:
    """docs/benchmarks.md (and its chart, next to it in img/) from one run's results."""
    chart_ref = None
    if "error" not in results["accept"]:
        report.chart(out.parent / "img" / "benchmarks.png", results["accept"])
        chart_ref = "img/benchmarks.png"
    report.write_markdown(
        out, results, targets(results), chart_ref, before=(before, targets(before)) if before else None
    )


if __name__ == "__main__":
    sys.exit(main())
