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


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:,.2f}"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: Path, results: dict[str, Any], targets: list[Target], chart: str | None) -> None:
    """Write the generated section, keeping the analysis section of the existing file."""
    old = path.read_text() if path.exists() else ""
    analysis = _between(old, ANALYSIS) or "\n_Not written yet._\n"
    body = "\n".join([
        "# Benchmarks", "",
        "How fast, how small, how heavy: every figure below comes from `make bench` (`scripts/bench`),",
        "measured on loopback in one run, each next to a baseline measured in the same run.", "",
        GEN[0], generated(results, targets, chart), GEN[1], "",
        "## Analysis", "", ANALYSIS[0], analysis.strip("\n"), ANALYSIS[1], "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def _between(text: str, marks: tuple[str, str]) -> str:
    m = re.search(re.escape(marks[0]) + r"(.*?)" + re.escape(marks[1]), text, re.S)
    return m.group(1) if m else ""


def generated(results: dict[str, Any], targets: list[Target], chart: str | None) -> str:
    parts = [f"_Run: {results['started']} in {results['seconds']:.0f} s._", "", "## Targets", "",
             "| figure | measured | target | verdict |", "|---|---|---|---|"]
    parts += [t.row() for t in targets]
    parts += ["", "## Machine and settings", "", _table(["", ""], [[k, v] for k, v in results["machine"].items()]),
              "", *[f"- {line}" for line in results["settings"]], ""]
    if chart:
        parts += [f"![relay vs baseline: throughput per concurrency and latency percentiles]({chart})", ""]
    parts += _sdk_section(results.get("sdk"))
    parts += _accept_section(results.get("accept"))
    parts += _misc_section(results)
    return "\n".join(parts)


def _sdk_section(sdk: dict[str, Any] | None) -> list[str]:
    out = ["## 1. SDK weight", ""]
    if not sdk or "error" in sdk:
        return out + [f"n/a ({(sdk or {}).get('error', 'not measured')})", ""]
    rows = [[w["campaign"], w["raw"], w["minified"], w["gzip"], w["brotli"]] for w in sdk["weights"]]
    out += [_table(["campaign", "raw B", "minified B", "gzip B", "brotli B"], rows), ""]
    page = sdk.get("page")
    if page and "error" not in page:
        out += [f"Demo landing page, first visit in Chromium: {page['requests']} requests, {page['bytes']:,} B "
                f"(headers + encoded bodies); of these the SDK's own: {page['sdk_requests']} request(s), "
                f"{page['sdk_bytes']:,} B.",
                f"DOMContentLoaded of the thank-you page (which fires its conversion then) to the relay storing "
                f"that event: median {page['dcl_to_relay_ms']} ms (trials: {page['dcl_to_relay_all']}).", ""]
    elif page:
        out += [f"Page load: n/a ({page['error']})", ""]
    return out


def _accept_section(accept: dict[str, Any] | None) -> list[str]:
    out = ["## 2. Accept path: `POST /api/event/{cid}`", ""]
    if not accept or "error" in accept:
        return out + [f"n/a ({(accept or {}).get('error', 'not measured')})", ""]
    rows = []
    for base, relay, slow in zip(accept["baseline"], accept["relay"], accept.get("relay_slow") or [],
                                 strict=False):
        rows.append([base["concurrency"],
                     f"{relay['rps']:,.0f}", f"{relay['p50_ms']:.1f} / {relay['p95_ms']:.1f} / {relay['p99_ms']:.1f}",
                     f"{slow['rps']:,.0f}", f"{slow['p50_ms']:.1f} / {slow['p95_ms']:.1f} / {slow['p99_ms']:.1f}",
                     f"{base['rps']:,.0f}", f"{base['p50_ms']:.1f} / {base['p95_ms']:.1f} / {base['p99_ms']:.1f}",
                     f"{relay['rps'] / base['rps']:.0%} / {slow['rps'] / base['rps']:.0%}",
                     relay["errors"] + slow["errors"] + base["errors"]])
    out += [_table(["conc.", "relay ev/s", "relay p50/p95/p99 ms", "relay, 300 ms upstream ev/s",
                    "p50/p95/p99 ms", "baseline ev/s", "baseline p50/p95/p99 ms", "ratio relay/baseline (fast / slow)",
                    "errors"], rows), ""]
    fixed = accept.get("fixed_rate")
    if fixed and "error" in fixed:
        out += [f"Fixed rate 500 ev/s: n/a ({fixed['error']})", ""]
    elif fixed:
        out += [f"Fixed rate (about {fixed['rate']:.0f} ev/s offered for {fixed['seconds']:.0f} s by "
                f"{fixed['concurrency']} paced connections): achieved {fixed['rps']:,.0f} ev/s, p50 {fixed['p50_ms']:.2f} ms, "
                f"p95 {fixed['p95_ms']:.2f} ms, p99 {fixed['p99_ms']:.2f} ms, max {fixed['max_ms']:.1f} ms, "
                f"errors {fixed['errors']}.", ""]
    return out


def _misc_section(results: dict[str, Any]) -> list[str]:
    out = ["## 3. End to end: relay vs straight to the sandbox", ""]
    e2e = results.get("e2e")
    if e2e and "error" not in e2e:
        out += [_table(["", "p50 ms", "p95 ms"], [
            ["browser-style post -> relay -> sandbox (200 after the inline attempt)", e2e["relay_p50_ms"], e2e["relay_p95_ms"]],
            ["post straight to the sandbox", e2e["direct_p50_ms"], e2e["direct_p95_ms"]],
            ["added by the relay", e2e["added_p50_ms"], e2e["added_p95_ms"]]]),
            "", f"{e2e['requests']} sequential requests each, alternating; relay answers other than 200: "
                f"{e2e['relay_non_200']}.", ""]
    else:
        out += [f"n/a ({(e2e or {}).get('error', 'not measured')})", ""]
    out += ["## 4. Drain: a backlog delivered to the sandbox", ""]
    rows = []
    for d in results.get("drain", []):
        if "error" in d:
            rows.append([d["store"], NA, NA, NA, NA, d["error"]])
            continue
        complete = d["delivered"] >= d["events"]
        note = "" if complete else f"stopped at the {d['limit']:.0f} s cap: {d['delivered']:,} of {d['events']:,} delivered"
        rows.append([d["store"], f"{d['events']:,}", f"{d['fill_seconds']} s", f"{d['seconds']} s",
                     f"{d['rps']:,.0f}", note or f"pending after: {d['pending_after']}"])
    out += [_table(["store", "events", "fill (Store.add)", "drain time", "ev/s", "note"], rows), ""]
    out += ["## 5. Memory: peak RSS (VmHWM) per relay worker", ""]
    mem = results.get("memory", {})
    out += [_table(["when", "per worker MB"], [[k, ", ".join(f"{v:.0f}" for v in vals) or NA]
                                              for k, vals in mem.items()]), ""]
    return out


def chart(path: Path, accept: dict[str, Any]) -> None:
    """Throughput per concurrency (relay, relay with 300 ms upstream, baseline) and latency percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"relay": accept["relay"], "relay, 300 ms upstream": accept.get("relay_slow") or [],
              "baseline (Flask, parse JSON, 204)": accept["baseline"]}
    conc = [r["concurrency"] for r in accept["baseline"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(series)
    for i, (label, rows) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(rows))]
        left.bar(xs, [r["rps"] for r in rows], width, label=label)
    left.set_xticks([j + width for j in range(len(conc))], [str(c) for c in conc])
    left.set_xlabel("concurrent connections (wrk)")
    left.set_ylabel("events/s")
    left.axhline(1000, color="grey", linestyle="--", linewidth=1, label="target 1,000 ev/s")
    left.set_title("Accept path throughput")
    left.legend(fontsize=8)
    styles = {"p50_ms": "-", "p95_ms": "--", "p99_ms": ":"}
    for (label, rows), color in zip(series.items(), ("C0", "C1", "C2"), strict=True):
        for key, style in styles.items():
            right.plot([r["concurrency"] for r in rows], [r[key] for r in rows], style, color=color,
                       marker="o", markersize=3, label=f"{label} {key[:-3]}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(conc, [str(c) for c in conc])
    right.set_xlabel("concurrent connections (wrk)")
    right.set_ylabel("latency ms (log)")
    right.set_title("Latency percentiles")
    right.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
