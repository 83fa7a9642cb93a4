"""The SDK's committed build (js_templates/compiled/): fresh, one variant per feature set, in budget.

The freshness check by hash needs nothing but Python (CI has no Node.js); where node and terser are
installed (``scripts/build-sdk`` installs terser), a rebuild must also give the committed bytes.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from bench.sdk_weight import DEMO_GZIP_BUDGET, EVERY_FEATURE_GZIP_BUDGET, all_features_config
from server import sdk, sdk_build
from server.config import load_config

ROOT = Path(__file__).resolve().parent.parent
STALE = "the committed SDK build is stale: run scripts/build-sdk and commit js_templates/compiled/"


def manifest() -> dict:
    return json.loads((sdk_build.COMPILED_DIR / sdk_build.MANIFEST).read_text(encoding="utf-8"))


def test_committed_build_matches_its_sources() -> None:
    assert manifest()["sources_sha256"] == sdk_build.sources_digest(), STALE


def test_one_committed_variant_per_feature_set() -> None:
    expected = sorted(sdk.variant_name(features) for features in sdk_build.feature_sets())
    assert len(expected) == 2 ** len(sdk_build.feature_flags())
    assert manifest()["flags"] == list(sdk_build.feature_flags()), STALE
    assert manifest()["variants"] == expected, STALE
    on_disk = sorted(
        p.name
        for p in sdk_build.COMPILED_DIR.iterdir()
        if p.name not in (sdk_build.MANIFEST, sdk.DEBUG_PANEL_FILE)
    )
    assert on_disk == expected, STALE


def test_each_variant_takes_the_config_in_one_place() -> None:
    for name in manifest()["variants"]:
        text = (sdk_build.COMPILED_DIR / name).read_text(encoding="utf-8")
        assert text.count("{{") == 1 and text.count(sdk_build.CONFIG_SLOT) == 1, name
        assert "{%" not in text.replace("{% raw %}", "").replace("{% endraw %}", ""), name


def test_a_rebuild_gives_the_committed_bytes(tmp_path: Path) -> None:
    if shutil.which("node") is None or not (ROOT / "node_modules" / "terser").is_dir():
        pytest.skip("needs node and terser (scripts/build-sdk installs it); the hash test runs everywhere")
    sdk_build.build(tmp_path / "compiled")
    for path in sorted(sdk_build.COMPILED_DIR.iterdir()):
        assert (tmp_path / "compiled" / path.name).read_bytes() == path.read_bytes(), f"{path.name}: {STALE}"
    assert len(list((tmp_path / "compiled").iterdir())) == len(list(sdk_build.COMPILED_DIR.iterdir()))


def test_the_template_uses_the_config_only_through_tojson() -> None:
    # The placeholder appears once in the readable source of every variant (render_source checks).
    for features in sdk_build.feature_sets():
        assert sdk_build.render_source(features).count(sdk_build.PLACEHOLDER) == 1


def test_script_features_names_the_build_flags() -> None:
    config = all_features_config()
    features = sdk.script_features(config.campaigns["cmp_full"])
    assert sorted(sdk.build_flags(config.campaigns["cmp_full"])) == list(sdk_build.feature_flags())
    assert sorted(features) == [flag for flag in sdk_build.feature_flags() if flag != sdk.DEBUG_FLAG]
    assert all(features.values()), "cmp_full must switch every feature on, or its budget test proves less"


def _gzip_size(config_name: str) -> tuple[int, int, int]:
    config, cid = (
        (load_config(ROOT / "server" / "demo.toml"), "cmp_demo")
        if config_name == "demo"
        else (all_features_config(), "cmp_full")
    )
    built = sdk.render_sdk(config.campaigns[cid], config.relay)
    assert gzip.decompress(built.gzip) == built.body
    print(
        f"\n{config_name} SDK: {len(built.body)} B minified, {len(built.gzip)} B gzip, {len(built.br)} B brotli"
    )
    return len(built.body), len(built.gzip), len(built.br)


# The demo's budget is not met (docs/benchmarks.md, "SDK budgets": with the debug code in its own
# build and zopfli's gzip, what is left is the behaviour a pasted tag relies on). strict: the day it
# is met, this fails until the marker goes, so the budget then holds for good.
NOT_MET = "issue 13's demo budget, not met: see docs/benchmarks.md, SDK budgets"


@pytest.mark.xfail(strict=True, reason=NOT_MET)
def test_demo_campaign_budget() -> None:
    assert _gzip_size("demo")[1] <= DEMO_GZIP_BUDGET


def test_every_feature_on_budget() -> None:
    assert _gzip_size("full")[1] <= EVERY_FEATURE_GZIP_BUDGET


def test_the_demo_stays_under_its_ceiling() -> None:
    # Until its budget is met: never above what it costs now (the SDK review's fixes included, and
    # since then the kept stub reference's, +17 B; two shorter rewrites, -4 B; the relay's field
    # lists as regular expressions, -28 B; `document` as a parameter, -6 B; terser inline: 1, -7 B;
    # `generate` left out when on, -4 B; four arrows and arguments written shorter, -6 B; a made-up
    # transaction id giving way to Pingtree's click cookie, +34 B; hidden inputs filled at `load`,
    # -6 B).
    assert _gzip_size("demo")[1] <= 2170


def test_the_digest_covers_every_template_and_the_minifier() -> None:
    inputs = {p.relative_to(ROOT).as_posix() for p in sdk_build.source_files()}
    templates = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "js_templates").rglob("*")
        if p.is_file() and "compiled" not in p.parts
    }
    assert templates <= inputs and "js_templates/sdk.js.j2" in inputs
    assert {"package-lock.json", "scripts/sdk-minify.mjs", "server/sdk_build.py"} <= inputs
