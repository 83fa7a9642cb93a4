"""docs/benchmarks.md and docs/img/benchmarks.png from one run's results.

The generated part sits between ``<!-- generated:start -->`` and ``<!-- generated:end -->``; the
hand-written analysis between ``<!-- analysis:start -->`` and ``<!-- analysis:end -->`` is kept
from the existing file, so re-running the suite refreshes figures without losing the prose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GEN = ("<!-- generated:start -->", "<!-- generated:end -->")
ANALYSIS = ("<!-- analysis:start -->", "<!-- analysis:end -->")
NA = "n/a"


@dataclass(frozen=True)
class Target:
    """One figure against its target: ``at_most`` for sizes and latencies, else at least."""

    name: str
    value: float | None
    target: float
    unit: str
    at_most: bool
    aim: float | None = None
    why_missing: str = ""

    def verdict(self) -> str:
        if self.value is None:
            return f"n/a ({self.why_missing})" if self.why_missing else NA
        gap = self.value - self.target if self.at_most else self.target - self.value
        if gap <= 0:
            aim = ""
            if self.aim is not None:
                met_aim = self.value <= self.aim if self.at_most else self.value >= self.aim
                aim = " (aim met too)" if met_aim else f" (aim {_num(self.aim)} {self.unit} not reached)"
            return f"**met**{aim}"
        return f"**missed** by {_num(gap)} {self.unit} ({gap / self.target:.0%})"

    def row(self) -> str:
        value = NA if self.value is None else f"{_num(self.value)} {self.unit}"
        sign = "<=" if self.at_most else ">="
        aim = f" (aim {_num(self.aim)})" if self.aim is not None else ""
        return f"| {self.name} | {value} | {sign} {_num(self.target)}{aim} {self.unit} | {self.verdict()} |"


def _value(x: float | None, unit: str) -> str:
    return NA if x is None else f"{_num(x)} {unit}"


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:,.2f}"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def best_rps(accept: dict[str, Any], key: str) -> float | None:
    """The best events/s of one sweep (``accept[key]``), None when it is missing."""
    rows = accept.get(key) or []
    return max(r["rps"] for r in rows) if rows else None


def ratio(accept: dict[str, Any], a: str, b: str) -> float | None:
    """Best of sweep ``a`` over best of sweep ``b``, both from the same run."""
    top, bottom = best_rps(accept, a), best_rps(accept, b)
    return round(top / bottom, 2) if top is not None and bottom else None


# The bare Flask sweeps measured just before and just after each relay sweep that is compared with
# bare Flask: this host's speed drifts by up to 2x within minutes, so a ratio against one sweep
# taken minutes away measures the drift as much as the relay. (A run from before the sweeps after
# existed: against its one bare sweep.)
BARE_SWEEPS = ("baseline", "baseline_after_slow", "baseline_after_down")  # in the order they run
BARE_BRACKETS = {"relay_slow": BARE_SWEEPS[0:2], "relay_down": BARE_SWEEPS[1:3]}
SWEEPS = ("relay", "proxy", "relay_slow", "relay_down", *BARE_SWEEPS)


def bare_points(accept: dict[str, Any], key: str) -> list[float]:
    """Bare Flask's events/s at each concurrency, the mean of the sweeps bracketing sweep ``key``."""
    sweeps = [accept[k] for k in BARE_BRACKETS[key] if accept.get(k)] or [accept.get(BARE_SWEEPS[0]) or []]
    return [sum(p["rps"] for p in points) / len(points) for points in zip(*sweeps, strict=True)]


def bare_ratio(accept: dict[str, Any], key: str) -> float | None:
    """Best of relay sweep ``key`` over the best of bare Flask's sweeps bracketing it (their mean)."""
    top, bottom = best_rps(accept, key), max(bare_points(accept, key), default=None)
    return round(top / bottom, 2) if top is not None and bottom else None


def write_markdown(
    path: Path,
    results: dict[str, Any],
    targets: list[Target],
    chart: str | None,
    before: tuple[dict[str, Any], list[Target]] | None = None,
) -> None:
    """Write the generated section, keeping the analysis section of the existing file."""
    old = path.read_text() if path.exists() else ""
    analysis = _between(old, ANALYSIS) or "\n_Not written yet._\n"
    body = "\n".join(
        [
            "# Benchmarks",
            "",
            "How fast, how small, how heavy: every figure below comes from `make bench` (`scripts/bench`),",
            "measured on loopback in one run, each next to a baseline measured in the same run.",
            "",
            GEN[0],
            generated(results, targets, chart, before),
            GEN[1],
            "",
            "## Analysis",
            "",
            ANALYSIS[0],
            analysis.strip("\n"),
            ANALYSIS[1],
            "",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def before_after(before: dict[str, Any], then: list[Target], now: list[Target]) -> list[str]:
    """Each target's figure in the earlier run next to this run's."""
    earlier = {t.name: t for t in then}
    rows = []
    for t in now:
        b = earlier.get(t.name)
        rows.append([t.name, _value(b.value, t.unit) if b else NA, _value(t.value, t.unit), t.verdict()])
    return [
        f"## Before / after (before: the run of {before.get('started', '?')})",
        "",
        _table(["figure", "before", "now", "now vs target"], rows),
        "",
    ]


def _between(text: str, marks: tuple[str, str]) -> str:
    m = re.search(re.escape(marks[0]) + r"(.*?)" + re.escape(marks[1]), text, re.S)
    return m.group(1) if m else ""


def generated(
    results: dict[str, Any],
    targets: list[Target],
    chart: str | None,
    before: tuple[dict[str, Any], list[Target]] | None = None,
) -> str:
    parts = [
        f"_Run: {results['started']} in {results['seconds']:.0f} s._",
        "",
        "## Targets",
        "",
        "| figure | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    parts += [t.row() for t in targets]
    parts += [""]
    if before:
        parts += before_after(before[0], before[1], targets)
    loadavg = results.get("loadavg") or {}
    parts += [
        "## Machine and settings",
        "",
        _table(["", ""], [[k, v] for k, v in results["machine"].items()]),
        "",
        *[f"- {line}" for line in results["settings"]],
        "- load average (1 min) at the start of each part: "
        + ", ".join(f"{k} {v}" for k, v in loadavg.items()),
        f"- {wrk_check(results)}",
        "",
    ]
    if chart:
        parts += [
            f"![relay vs naive proxy vs bare Flask: throughput per concurrency and latency]({chart})",
            "",
        ]
    parts += _sdk_section(results.get("sdk"))
    parts += _accept_section(results.get("accept"))
    parts += _misc_section(results)
    return "\n".join(parts)


def load_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every wrk run of ``results`` (sweeps, fixed rate, sustained)."""
    accept = results.get("accept") or {}
    runs = [r for key in SWEEPS for r in accept.get(key) or []]
    runs += [
        accept[key]
        for key in ("fixed_rate", "fixed_rate_conversions")
        if "wrk_cpu_percent" in (accept.get(key) or {})
    ]
    return runs + [r for r in results.get("sustained") or [] if "wrk_cpu_percent" in r]


def wrk_check(results: dict[str, Any]) -> str:
    """Whether the load generator could have been the bottleneck: its CPU share in every run."""
    shares = [r["wrk_cpu_percent"] for r in load_results(results)]
    if not shares:
        return "load generator CPU: not measured"
    return (
        f"load generator: wrk used {min(shares):.0f} to {max(shares):.0f} % of one core in the runs "
        f"(of the machine's 200 %), so it is never what limits a figure."
    )


def _sdk_section(sdk: dict[str, Any] | None) -> list[str]:
    out = ["## 1. SDK weight", ""]
    if not sdk or "error" in sdk:
        return out + [f"n/a ({(sdk or {}).get('error', 'not measured')})", ""]
    rows = [[w["campaign"], w["raw"], w["minified"], w["gzip"], w["brotli"]] for w in sdk["weights"]]
    out += [_table(["campaign", "raw B", "minified B", "gzip B", "brotli B"], rows), ""]
    page = sdk.get("page")
    if page and "error" not in page:
        out += [
            f"Demo landing page, first visit in Chromium: {page['requests']} requests, {page['bytes']:,} B "
            f"(headers + encoded bodies); of these the SDK's own: {page['sdk_requests']} request(s), "
            f"{page['sdk_bytes']:,} B.",
            f"DOMContentLoaded of the thank-you page (which fires its conversion then) to the relay storing "
            f"that event: median {page['dcl_to_relay_ms']} ms (trials: {page['dcl_to_relay_all']}).",
            "",
        ]
    elif page:
        out += [f"Page load: n/a ({page['error']})", ""]
    return out


def _lat(r: dict[str, Any]) -> str:
    return f"{r['rps']:,.0f} ({r['p50_ms']:.1f} / {r['p99_ms']:.1f})"


def _bare_drift(accept: dict[str, Any]) -> list[str]:
    """Bare Flask's sweeps either side of the slow and the down relay's, which their ratios use."""
    if not all(accept.get(k) for k in BARE_SWEEPS):
        return ["slow / bare and down / bare: against the one bare Flask sweep above.", ""]
    rows = [
        [points[0]["concurrency"], *[_lat(p) for p in points]]
        for points in zip(*(accept[k] for k in BARE_SWEEPS), strict=True)
    ]
    return [
        "Bare Flask was measured three times: before the slow relay's sweep (the column above), between "
        "it and the down relay's, and after that. slow / bare and down / bare are against the mean of "
        "the two sweeps either side, so that the host's drift between sweeps (the three below) does not "
        "pass for the relay's speed.",
        "",
        _table(["conc.", "bare Flask, before the slow relay", "between slow and down", "after down"], rows),
        "",
    ]


def _accept_section(accept: dict[str, Any] | None) -> list[str]:
    out = ["## 2. Accept path: `POST /api/event/{cid}`", ""]
    if not accept or "error" in accept:
        return out + [f"n/a ({(accept or {}).get('error', 'not measured')})", ""]
    keys = ("relay", "proxy", "baseline", "relay_slow", "relay_down")
    sweeps = [accept.get(k) or [] for k in keys]
    bare_slow, bare_down = bare_points(accept, "relay_slow"), bare_points(accept, "relay_down")
    rows = []
    for points, slow_bare, down_bare in zip(zip(*sweeps, strict=False), bare_slow, bare_down, strict=False):
        relay, proxy, _, slow, down = points
        rows.append(
            [
                relay["concurrency"],
                *[_lat(p) for p in points],
                f"{relay['rps'] / proxy['rps']:.2f}x",
                f"{slow['rps'] / slow_bare:.2f}x",
                f"{down['rps'] / down_bare:.2f}x",
                sum(p["errors"] for p in points),
            ]
        )
    out += [
        "Events/s at each concurrency (p50 / p99 ms). Upstream: the fake Pingtree answering at once, "
        "in 300 ms (slow) or not at all (down, connection refused).",
        "",
        _table(
            [
                "conc.",
                "relay, fast upstream",
                "naive proxy",
                "bare Flask",
                "relay, 300 ms upstream",
                "relay, upstream down",
                "relay / proxy",
                "slow / bare",
                "down / bare",
                "errors",
            ],
            rows,
        ),
        "",
        *_bare_drift(accept),
    ]
    cpu_rows = [
        [
            r["concurrency"],
            *[p.get("server_cpu_ms_per_event") for p in (r, *others)],
            f"{max(p['wrk_cpu_percent'] for p in (r, *others)):.0f} %",
        ]
        for r, *others in zip(*sweeps, strict=False)
    ]
    out += [
        "CPU per accepted event (ms, all the server's processes; the relay's includes its deliveries):",
        "",
        _table(
            [
                "conc.",
                "relay, fast",
                "naive proxy",
                "bare Flask",
                "relay, slow",
                "relay, down",
                "wrk CPU (max)",
            ],
            cpu_rows,
        ),
        "",
    ]
    out += _every_line_rows(accept)
    for key, what in (
        ("fixed_rate", "Fixed rate"),
        (
            "fixed_rate_conversions",
            "The same for conversions (each tried inline, the upstream's answer included)",
        ),
    ):
        fixed = accept.get(key)
        if fixed and "error" in fixed:
            out += [f"{what}, 500 ev/s: n/a ({fixed['error']})", ""]
        elif fixed:
            out += [
                f"{what} (about {fixed['rate']:.0f} ev/s offered open loop for {fixed['seconds']:.0f} s, fast "
                f"upstream): achieved {fixed['rps']:,.0f} ev/s, p50 {fixed['p50_ms']:.2f} ms, "
                f"p95 {fixed['p95_ms']:.2f} ms, p99 {fixed['p99_ms']:.2f} ms, max {fixed['max_ms']:.1f} ms, "
                f"errors {fixed['errors']}; relay CPU {fixed.get('server_cpu_percent', 0):.0f} % of a core.",
                "",
            ]
    return out


def _every_line_rows(accept: dict[str, Any]) -> list[str]:
    """The slow relay as configured by default against the same with every decision line written
    (``relay.decision_log_limit = 0``), swept one after the other."""
    every = accept.get("relay_slow_every_line")
    if not every or not accept.get("relay_slow"):
        return []
    rows = [
        [
            limited["concurrency"],
            _lat(limited),
            limited.get("server_cpu_ms_per_event"),
            _lat(unlimited),
            unlimited.get("server_cpu_ms_per_event"),
            f"{limited['rps'] / unlimited['rps']:.2f}x" if unlimited["rps"] else "n/a",
        ]
        for limited, unlimited in zip(accept["relay_slow"], every, strict=False)
    ]
    return [
        "Decision lines, 300 ms upstream: the relay as above (`relay.decision_log_limit`, default 50 lines "
        "of each level a second per process, the rest counted) against the same with every line written "
        "(`0`), swept right after it:",
        "",
        _table(
            [
                "conc.",
                "default limit: ev/s (p50 / p99)",
                "CPU ms/event",
                "every line: ev/s (p50 / p99)",
                "CPU ms/event",
                "default / every line",
            ],
            rows,
        ),
        "",
    ]


def _misc_section(results: dict[str, Any]) -> list[str]:
    out = ["## 3. End to end: relay vs straight to the upstream", ""]
    e2e = results.get("e2e")
    if e2e and "error" not in e2e:
        out += [
            _table(
                ["", "p50 ms", "p95 ms"],
                [
                    [
                        "browser-style post -> relay -> upstream (200 after the inline attempt)",
                        e2e["relay_p50_ms"],
                        e2e["relay_p95_ms"],
                    ],
                    [
                        "post straight to the upstream (the fake Pingtree, answering at once)",
                        e2e["direct_p50_ms"],
                        e2e["direct_p95_ms"],
                    ],
                    ["added by the relay", e2e["added_p50_ms"], e2e["added_p95_ms"]],
                ],
            ),
            "",
            f"{e2e['requests']} sequential requests each, alternating, "
            + (f"a pair every {e2e['pace_ms']:g} ms" if "pace_ms" in e2e else "back to back")
            + f"; relay answers other than 200: {e2e['relay_non_200']}.",
            "",
        ]
    else:
        out += [f"n/a ({(e2e or {}).get('error', 'not measured')})", ""]
    out += _sustained_section(results.get("sustained"))
    out += _drain_section(results.get("drain") or [])
    out += ["## 6. Memory: peak RSS (VmHWM) per relay process", ""]
    mem = results.get("memory", {})
    out += [
        _table(
            ["when", "per process MB"],
            [[k, ", ".join(f"{v:.0f}" for v in vals) or NA] for k, vals in mem.items()],
        ),
        "",
    ]
    out += _profile_section(results.get("profiles") or {})
    out += _sandbox_section(results.get("sandbox"))
    return out


def _sandbox_section(sandbox: dict[str, Any] | None) -> list[str]:
    out = ["## 8. The sandbox's own capacity (`pingtree-relay sandbox`, every answer held 300 ms)", ""]
    if not sandbox or "error" in sandbox:
        return out + [f"n/a ({(sandbox or {}).get('error', 'not measured')})", ""]
    return out + [
        f"{sandbox['rate']:,} ev/s offered open loop on up to {sandbox['concurrency']:,} connections for "
        f"{sandbox['seconds']:.0f} s: {sandbox['rps']:,.0f} answers/s, p50 {sandbox['p50_ms']:.0f} ms, "
        f"p99 {sandbox['p99_ms']:.0f} ms, errors {sandbox['errors']}; at most {sandbox['peak_held']:,} answers held "
        f"at once (sampled); {sandbox['accepted_by_sandbox']:,} events accepted; sandbox CPU "
        f"{sandbox['server_cpu_ms_per_event']} ms per event. (Under gunicorn with 64 threads it could hold 64: "
        "about 200 ev/s at 300 ms.)",
        "",
    ]


def _sustained_section(rows: list[dict[str, Any]] | dict[str, Any] | None) -> list[str]:
    out = ["## 4. Sustained delivery: 1,000 ev/s offered, open loop", ""]
    if not rows or isinstance(rows, dict):
        return out + [f"n/a ({(rows or {}).get('error', 'not measured')})", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([f"{r['latency_ms']} ms", NA, NA, NA, NA, NA, NA, NA, NA, r["error"]])
            continue
        empty = (
            f"{r['empty_seconds']} s"
            if r["empty_seconds"] is not None
            else f"not within {r['empty_cap']:.0f} s ({r['accepted'] - r['delivered_total']:,} left)"
        )
        table.append(
            [
                f"{r['latency_ms']:g} ms",
                f"{r['offered_rate']:,.0f} for {r['seconds']:.0f} s",
                f"{r['accepted_rate']:,.0f}",
                f"{r['delivered_rate']:,.0f}",
                f"{r['backlog_mid']:,} / {r['backlog_end']:,} ({r['backlog_growth']:+,.0f}/s)",
                empty,
                r["peak_in_flight"],
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
                f"{r['relay_cpu_percent']:.0f} / {r['upstream_cpu_percent']:.0f} / {r['wrk_cpu_percent']:.0f}",
                f"errors {r['answer_errors']}, repeats {r['repeats']}"
                + (f"; trials {', '.join(f'{t:,.0f}' for t in r['trials'])}" if r.get("trials") else ""),
            ]
        )
    return out + [
        _table(
            [
                "upstream latency",
                "offered ev/s",
                "accepted ev/s",
                "delivered ev/s",
                "backlog mid / end (growth)",
                "time to empty",
                "peak in flight (upstream)",
                "answer p50 / p99 ms",
                "CPU % relay / upstream / wrk",
                "notes",
            ],
            table,
        ),
        "",
    ]


def _drain_section(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## 5. Drain: a backlog delivered", ""]
    table = []
    for d in rows:
        upstream = {"sandbox": "fast sandbox", "300ms": "300 ms fake"}.get(
            d.get("upstream", ""), d.get("upstream")
        )
        if "error" in d:
            table.append([d["store"], upstream, NA, NA, NA, NA, NA, d["error"]])
            continue
        complete = d["delivered"] >= d["events"]
        note = (
            ""
            if complete
            else f"stopped at the {d['limit']:.0f} s cap: {d['delivered']:,} of {d['events']:,} delivered"
        )
        table.append(
            [
                d["store"],
                upstream,
                f"{d['events']:,}",
                f"{d['fill_seconds']} s",
                f"{d['seconds']} s",
                f"{d['rps']:,.0f}",
                NA if d.get("peak_in_flight") is None else d["peak_in_flight"],
                note or f"pending after: {d['pending_after']}",
            ]
        )
    return out + [
        _table(
            [
                "store",
                "upstream",
                "events",
                "fill (Store.add)",
                "drain time",
                "ev/s",
                "peak in flight",
                "note",
            ],
            table,
        ),
        "",
    ]


def _profile_section(profiles: dict[str, Any]) -> list[str]:
    out = ["## 7. Profiles (py-spy on the live relay workers)", ""]
    if not profiles:
        return out + ["n/a (not taken: `--quick` or `--no-profiles`)", ""]
    for name, p in profiles.items():
        if "error" in p:
            out += [f"**{name}**: n/a ({p['error']})", ""]
            continue
        gil = ", ".join(f"{g} %" for g in p.get("gil_busy_percent", []))
        out += [
            f"**{name}** ({p.get('load', '')}; GIL held per worker: {gil}; {p['samples']:,} samples of the "
            f"GIL holder, {p['waiting_percent']:.0f} % of them caught releasing it in select/recv/locks). "
            "Of the other samples:",
            "",
            _table(
                ["self %", "function", "inclusive %", "function "],
                [
                    [a[1] if a else "", f"`{a[0]}`" if a else "", b[1] if b else "", f"`{b[0]}`" if b else ""]
                    for a, b in _pairs(p["self"], p["inclusive"])
                ],
            ),
            "",
        ]
        for pid, d in (p.get("dumps") or {}).items():
            where = "; ".join(f"{n} x `{w}`" for w, n in d["where"])
            out += [f"Dump of worker {pid}, {d['threads']} threads: {where}.", ""]
    return out


def _pairs(a: list[Any], b: list[Any]) -> list[tuple[Any, Any]]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def chart(path: Path, accept: dict[str, Any]) -> None:
    """Throughput per concurrency (relay fast / slow / down, naive proxy, bare Flask) and latency percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {
        "relay": "relay, fast upstream",
        "relay_slow": "relay, 300 ms upstream",
        "relay_down": "relay, upstream down",
        "proxy": "naive proxy (Flask + httpx.post)",
        "baseline": "bare Flask (parse JSON, 204)",
    }
    series = {label: accept.get(key) or [] for key, label in names.items() if accept.get(key)}
    conc = [r["concurrency"] for r in accept["baseline"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(series)
    for i, (label, rows) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(rows))]
        left.bar(xs, [r["rps"] for r in rows], width, label=label)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(conc))], [str(c) for c in conc])
    left.set_xlabel("concurrent connections (wrk)")
    left.set_ylabel("events/s")
    left.axhline(1000, color="grey", linestyle="--", linewidth=1, label="1,000 ev/s")
    left.set_title("Accept path throughput")
    left.legend(fontsize=7)
    for (label, rows), color in zip(series.items(), ("C0", "C1", "C2", "C3", "C4"), strict=False):
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            right.plot(
                [r["concurrency"] for r in rows],
                [r[key] for r in rows],
                style,
                color=color,
                marker="o",
                markersize=3,
                label=f"{label} {key[:-3]}",
            )
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(conc, [str(c) for c in conc])
    right.set_xlabel("concurrent connections (wrk)")
    right.set_ylabel("latency ms (log)")
    right.set_title("Latency p50 (solid) and p99 (dotted)")
    right.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
