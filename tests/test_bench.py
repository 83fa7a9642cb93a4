"""The benchmark suite's own pieces still work (a config change once broke its SDK figures silently)."""

from __future__ import annotations

from bench import load, sdk_weight
from bench.e2e import percentile


def test_sdk_weights_build_for_both_campaigns() -> None:
    weights = {w.campaign: w for w in sdk_weight.weights()}
    assert set(weights) == {"cmp_demo", "cmp_full"}
    for w in weights.values():
        assert 0 < w.brotli < w.gzip < w.minified < w.raw
    assert weights["cmp_demo"].gzip <= 2500  # the budget, also asserted in test_sdk.py


def test_wrk_summary_is_parsed() -> None:
    line = ('WRK_JSON {"requests":1000,"duration_us":2000000,"bytes":1,"connect":0,"read":1,"write":0,'
            '"status":2,"timeout":0,"mean":900.0,"p50":800,"p90":1500,"p95":2000,"p99":5000,"max":9000}')
    result = load.parse_wrk("noise\n" + line + "\n", concurrency=8)
    assert (result.rps, result.p50_ms, result.p99_ms, result.errors) == (500.0, 0.8, 5.0, 3)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([], 50)) == (50.0, 99.0, 0.0)


def test_durability_figures_are_in_the_docs_for_both_stores_and_faults() -> None:
    from pathlib import Path

    from bench.durability import MARKERS, Figures, markdown

    text = (Path(__file__).resolve().parent.parent / "docs" / "durability.md").read_text()
    table = text[text.index(MARKERS[0]):text.index(MARKERS[1])]
    for store in ("sqlite", "redis"):
        for fault in ("relay kill -9", "store outage"):
            assert f"| {store} | {fault} |" in table, f"no {store}/{fault} figures in docs/durability.md"
    row = markdown([Figures("sqlite", "store outage", 10, 9, 9, 0, 1, 2, 3)], 10).splitlines()[-1]
    assert row == "| sqlite | store outage | 10 | 9 | 9 | 0 | 1 | 2 | 3 |"
