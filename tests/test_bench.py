"""The benchmark suite's own pieces still work (a config change once broke its SDK figures silently)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench import instructions, load, profile, report, sdk_weight, servers, sustained
from bench.e2e import percentile
from tests.conftest import wait_for


def test_sdk_weights_build_for_both_campaigns() -> None:
    weights = {w.campaign: w for w in sdk_weight.weights()}
    assert set(weights) == {"cmp_demo", "cmp_full"}
    for w in weights.values():
        assert 0 < w.brotli < w.gzip < w.minified < w.raw
    assert weights["cmp_demo"].gzip <= 2500  # the budget, also asserted in test_sdk_build.py


def wrk_json(**errors: int) -> str:
    """The summary line post_event.lua's ``done()`` prints: 1,000 requests in 2 s, with ``errors`` by kind."""
    counts = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0, **errors}
    summary = {"requests": 1000, "duration_us": 2000000, "bytes": 1, **counts, "mean": 900.0}
    return "WRK_JSON " + json.dumps(
        {**summary, "p50": 800, "p90": 1500, "p95": 2000, "p99": 5000, "max": 9000}, separators=(",", ":")
    )


def test_wrk_summary_is_parsed() -> None:
    line = wrk_json(read=1, status=2)
    result = load.parse_wrk("noise\n" + line + "\n", concurrency=8)
    assert (result.rps, result.p50_ms, result.p99_ms, result.errors) == (500.0, 0.8, 5.0, 3)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([], 50)) == (50.0, 99.0, 0.0)


# --- the fake upstream, the naive proxy, the paced load: real processes on loopback ------------------


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[servers.Server]:
    with servers.fake_upstream(tmp_path, 0) as server:
        yield server


def _post(url: str, transaction_id: str, cid: str = "cmp_bench") -> httpx.Response:
    return httpx.post(
        f"{url}/api/event/{cid}",
        json={"event_id": "quote_viewed", "transaction_id": transaction_id},
        timeout=10,
    )


def configure(upstream: servers.Server, **settings: object) -> httpx.Response:
    """Set the fake upstream's behaviour (``latency_ms``, ...) through its control API."""
    return httpx.post(upstream.url + "/_upstream/config", json=settings, timeout=10)


def test_fake_upstream_answers_pingtree_success_and_counts_repeats(upstream: servers.Server) -> None:
    first = _post(upstream.url, "t1")
    assert first.status_code == 200
    assert first.json()["message"] == "Event triggered successfully"
    assert first.json()["data"]["transaction_id"] == "t1"
    _post(upstream.url, "t1")
    _post(upstream.url, "t2")
    httpx.post(f"{upstream.url}/api/event/cmp_bench", content=b"not json", timeout=10)
    stats = servers.upstream_stats(upstream)
    assert {k: stats[k] for k in ("received", "unique", "repeats", "bad", "answered", "in_flight")} == {
        "received": 4,
        "unique": 2,
        "repeats": 1,
        "bad": 1,
        "answered": 4,
        "in_flight": 0,
    }
    assert httpx.post(upstream.url + "/_upstream/reset", timeout=10).json()["received"] == 0


def test_fake_upstream_holds_answers_and_counts_peak_in_flight(upstream: servers.Server) -> None:
    # Long enough that all 30 senders are surely in flight together, even on a loaded machine.
    configure(upstream, latency_ms=4000).raise_for_status()
    with ThreadPoolExecutor(30) as pool:
        answers = [pool.submit(_post, upstream.url, f"held{i}") for i in range(30)]
        wait_for(lambda: servers.upstream_stats(upstream)["peak_in_flight"] == 30, message="30 answers held")
        assert all(a.result().status_code == 200 for a in answers)
    stats = servers.upstream_stats(upstream)
    assert (stats["peak_in_flight"], stats["in_flight"], stats["unique"]) == (30, 0, 30)
    bad = configure(upstream, latency=1)
    assert bad.status_code == 400 and bad.json()["type"] == "error"


def test_naive_proxy_passes_the_upstream_answer_back(tmp_path: Path, upstream: servers.Server) -> None:
    with servers.naive_proxy(tmp_path, upstream.url) as proxy:
        answer = _post(proxy.url, "via-proxy")
        assert proxy.worker_pids()  # gunicorn workers, as for serve
    assert answer.status_code == 200 and answer.json()["data"]["transaction_id"] == "via-proxy"
    assert servers.upstream_stats(upstream)["unique"] == 1


def test_paced_load_keeps_to_its_rate_when_answers_are_slow(upstream: servers.Server) -> None:
    """Open loop: 100 ev/s for 3 s with every answer 400 ms late still offers ~300 events, never more."""
    configure(upstream, latency_ms=400).raise_for_status()
    result = load.run_paced(
        upstream.url, "/api/event/cmp_bench", rate=100, seconds=3, origin=servers.ORIGIN, connections=60
    )
    received = wait_for(
        lambda: (s := servers.upstream_stats(upstream))["in_flight"] == 0 and s["received"],
        message="the last answers",
    )
    assert 150 <= received <= 100 * result.seconds + 2  # the clock's rate, plus one start per wrk thread
    assert result.errors == 0 and result.p50_ms >= 400
    assert result.wrk_cpu_seconds > 0


def test_serve_defaults_are_read_from_the_serve_command() -> None:
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "--config", "x.toml"])
    assert servers.serve_defaults() == {"workers": args.workers, "threads": args.threads}


# --- pure pieces: ratios, verdicts, sustained figures, profiles ------------------------------------------


def test_ratio_is_best_of_each_sweep_of_the_same_run() -> None:
    accept = {
        "relay": [{"rps": 300.0}, {"rps": 900.0}],
        "proxy": [{"rps": 1200.0}, {"rps": 600.0}],
        "empty": [],
    }
    assert report.best_rps(accept, "relay") == 900.0
    assert report.ratio(accept, "relay", "proxy") == 0.75
    assert report.ratio(accept, "relay", "empty") is None and report.ratio(accept, "missing", "proxy") is None


def test_a_ratio_to_bare_flask_is_against_the_sweeps_either_side() -> None:
    # Bare Flask drifted from 2,000 to 3,000 ev/s at its best: the slow relay's 1,000 is against 2,500.
    accept = {
        "relay_slow": [{"rps": 400.0}, {"rps": 1000.0}],
        "baseline": [{"rps": 1000.0}, {"rps": 2000.0}],
        "baseline_after_slow": [{"rps": 1400.0}, {"rps": 3000.0}],
    }
    assert report.bare_points(accept, "relay_slow") == [1200.0, 2500.0]
    assert report.bare_ratio(accept, "relay_slow") == 0.4
    # A run from before the second sweep existed: against the one it has.
    del accept["baseline_after_slow"]
    assert report.bare_ratio(accept, "relay_slow") == 0.5
    assert report.bare_ratio(accept, "relay_down") is None  # no such sweep
    assert report.bare_ratio({**accept, "relay_down": [{"rps": 1400.0}]}, "relay_down") == 0.7


def test_target_verdicts_say_by_how_much() -> None:
    assert report.Target("r", 0.75, 1.0, "x", False).verdict() == "**missed** by 0.25 x (25%)"
    assert report.Target("p99", 20.0, 25, "ms", True).verdict() == "**met**"
    assert report.Target("d", None, 1, "ev/s", False, why_missing="no redis").verdict() == "n/a (no redis)"


def test_sustained_figures() -> None:
    row = sustained.SustainedResult(
        latency_ms=300,
        store="SQLite",
        offered_rate=1000,
        seconds=15.0,
        sent=14_000,
        accepted=15_000,
        answer_errors=0,
        delivered_during_load=1_500,
        backlog_mid=6_000,
        backlog_end=13_500,
        empty_seconds=None,
        empty_cap=45,
        delivered_total=6_000,
        repeats=0,
        peak_in_flight=36,
        p50_ms=1.0,
        p99_ms=9.0,
        wrk_cpu_percent=3.0,
        relay_cpu_percent=120.0,
        upstream_cpu_percent=4.0,
    )
    assert (row.accepted_rate, row.delivered_rate, row.backlog_growth) == (1000.0, 100.0, 1000.0)
    assert sustained.nearest([(1.0, 10), (7.4, 70), (8.1, 80)], 7.5) == 70
    assert sustained.nearest([], 3) == 0


def test_sustained_delivery_is_held_to_what_the_paced_load_put_in_within_its_slack() -> None:
    # 15,011 events in wrk's 15.02 s: everything offered, at the pacing's 999.4/s.
    assert sustained.delivery_target({"accepted_rate": 999.4}, 1000) == 999.4
    # An accept side 2 % behind does not lower the bar, nor does a missing or a faster figure.
    assert sustained.delivery_target({"accepted_rate": 980.0}, 1000) == 1000
    assert sustained.delivery_target({}, 1000) == 1000
    assert sustained.delivery_target({"accepted_rate": 1000.3}, 1000) == 1000


def test_a_sustained_row_is_the_median_trial_with_every_trial_listed() -> None:
    runs = [
        {"delivered_during_load": d, "seconds": 15.0, "run": i}
        for i, d in enumerate((14_700, 13_500, 15_000))
    ]
    row = sustained.median_trial([*runs[:2], {"error": "RuntimeError: upstream down"}, runs[2]])
    assert row["run"] == 0 and row["trials"] == [980.0, 900.0, 1000.0]  # in the order they ran
    assert sustained.median_trial([{"error": "x"}, {"error": "y"}]) == {"error": "x"}
    assert sustained.median_trial(runs[1:2])["trials"] == [900.0]


def test_wrk_cpu_share_and_accepted() -> None:
    result = load.parse_wrk(wrk_json(status=10), concurrency=8, wrk_cpu_seconds=0.5)
    assert (result.accepted, result.wrk_cpu_percent) == (990, 25.0)


PY_SPY_RAW = """\
<module> (server/cli.py:1);handle (gunicorn/workers/gthread.py:10);accept (server/relay.py:5);_write (server/outbox/sqlite.py:9) 30
<module> (server/cli.py:1);handle (gunicorn/workers/gthread.py:10);accept (server/relay.py:6);dumps (json/__init__.py:2) 10
<module> (server/cli.py:1);EpollSelector.select (selectors.py:468) 60
"""


def test_profile_summary_drops_waiting_samples_and_merges_lines(tmp_path: Path) -> None:
    (tmp_path / "p-1.txt").write_text(PY_SPY_RAW)
    summary = profile.summarise([tmp_path / "p-1.txt"])
    assert (summary["samples"], summary["busy_samples"], summary["waiting_percent"]) == (100, 40, 60.0)
    assert summary["self"][0] == ["_write (server/outbox/sqlite.py)", 75.0]
    assert ["accept (server/relay.py)", 100.0] in summary["inclusive"]  # two lines of one function


def test_dump_summary_counts_threads_by_where_they_are() -> None:
    dump = """Process 1: python
Thread 11 (idle): "ThreadPoolExecutor-0_0"
    read (httpcore/_backends/sync.py:128)
    _receive_event (httpcore/_sync/http11.py:217)
Thread 12 (idle): "ThreadPoolExecutor-0_1"
    read (httpcore/_backends/sync.py:128)
    _receive_event (httpcore/_sync/http11.py:217)
Thread 13 (active): "MainThread"
    select (selectors.py:468)
"""
    summary = profile.summarise_dump(dump)
    assert summary["threads"] == 3
    assert summary["where"][0] == (
        "idle: read (httpcore/_backends/sync.py) <- _receive_event (httpcore/_sync/http11.py)",
        2,
    )


def test_durability_figures_are_in_the_docs_for_both_stores_and_faults() -> None:
    from bench.durability import MARKERS, Figures, markdown

    text = (Path(__file__).resolve().parent.parent / "docs" / "durability.md").read_text()
    table = text[text.index(MARKERS[0]) : text.index(MARKERS[1])]
    for store in ("sqlite", "redis"):
        for fault in ("relay kill -9", "store outage"):
            assert f"| {store} | {fault} |" in table, f"no {store}/{fault} figures in docs/durability.md"
    row = markdown([Figures("sqlite", "store outage", 10, 9, 9, 0, 1, 2, 3)], 10).splitlines()[-1]
    assert row == "| sqlite | store outage | 10 | 9 | 9 | 0 | 1 | 2 | 3 |"


def test_a_server_stops_when_whoever_started_it_is_killed(tmp_path: Path) -> None:
    # A suite killed outright never runs its stop()s: the relay it started (master, workers and
    # delivery processes) must still go, not idle on into the next benchmark's figures.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from bench import servers\n"
        "work = Path(sys.argv[1])\n"
        "relay = servers.relay(work, 'http://127.0.0.1:9', f'sqlite:///{work / \"outbox.sqlite3\"}').start()\n"
        "kids = servers.wait_for(lambda: len(servers.descendants(relay.proc.pid)) >= 3 and servers.descendants(relay.proc.pid))\n"
        "print(' '.join(map(str, [relay.proc.pid, *kids])), flush=True)\n"
        "time.sleep(120)\n"
    )
    pids: list[int] = []
    with subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=servers.ROOT, stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            pids = [int(pid) for pid in parent.stdout.readline().split()]
            assert len(pids) >= 4, pids  # the master, its workers and its delivery process
        finally:
            parent.kill()
    try:
        wait_for(lambda: not any(_running(pid) for pid in pids), timeout=30, message="the orphans to stop")
    finally:  # failing, this test must not leave the very orphans it looks for
        if pids:
            try:
                os.killpg(pids[0], signal.SIGKILL)  # the master's session: it and its children
            except ProcessLookupError:  # all gone, as they should be
                pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by whoever adopts it, maybe later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_the_instruction_count_drives_accepted_events_only(tmp_path: Path) -> None:
    # bench.instructions counts what its driver does under callgrind: every event it posts must be
    # accepted (202 from the store), or the count measures refusals.
    assert instructions.drive(5, tmp_path) == {"202": 5}
    assert instructions._body(7) == instructions._body(7) != instructions._body(8)  # the same bytes each run


@pytest.mark.parametrize("given", ["0", "-3", "x", ""])
def test_the_instruction_count_refuses_a_count_it_cannot_divide_by(given: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        instructions._positive(given)
    assert instructions._positive("300") == 300
