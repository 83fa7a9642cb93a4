"""The delivery engine's configuration: ``relay.max_in_flight`` checked by check-config and by serve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import parse_config
from tests.conftest import ROOT
from tests.test_config import GOOD, check


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_in_flight = 0", "relay.max_in_flight: expected a whole number >= 1"),
        ("max_in_flight = 5001", "relay.max_in_flight: expected a whole number <= 5000"),
        ('max_in_flight = "400"', "relay.max_in_flight: expected a whole number"),
        ("max_in_flight = true", "relay.max_in_flight: expected a whole number"),
        ("max_in_flight = 12.5", "relay.max_in_flight: expected a whole number"),
        ("max_in_flight = 4", "relay.max_in_flight: must be more than inline_concurrency (4)"),
        ("delivery_concurrency = 8", "relay.delivery_concurrency: replaced by relay.max_in_flight"),
    ],
)
def test_check_config_names_the_delivery_key(tmp_path: Path, line: str, message: str) -> None:
    result = check(tmp_path, GOOD.replace("[relay]", f"[relay]\n{line}", 1))
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_max_in_flight_defaults_to_several_hundred_and_inline_off_frees_it() -> None:
    relay = parse_config({"relay": {"upstream_url": "http://x"}, "campaigns": {}}).relay
    assert relay.max_in_flight == 400
    small = parse_config(
        {"relay": {"upstream_url": "http://x", "max_in_flight": 2, "inline_concurrency": 0}, "campaigns": {}}
    ).relay
    assert small.max_in_flight == 2  # no inline attempts: the engine may have all of it


def test_serve_refuses_a_cap_the_workers_inline_attempts_would_fill(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(GOOD.replace("[relay]", "[relay]\nmax_in_flight = 12", 1))  # 4 workers x 4 inline = 16
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--config",
            str(path),
            "--workers",
            "4",
            "--port",
            "0",  # refused before it binds anything
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "relay.max_in_flight: must be more than workers x inline_concurrency (4 x 4)" in result.stderr


@pytest.mark.parametrize(("threads", "inline"), [("4", 4), ("7", 4), ("3", 2)])
def test_serve_refuses_inline_attempts_that_could_hold_most_threads(
    tmp_path: Path, threads: str, inline: int
) -> None:
    # Measured: --threads 4 with 4 inline attempts at a 300 ms upstream accepted 26 events/s of
    # 1,000 offered, every thread waiting on Pingtree while the CPU looked idle. (serve's defaults,
    # 8 threads and 4 inline, start in every test that runs serve.)
    path = tmp_path / "relay.toml"
    path.write_text(GOOD.replace("[relay]", f"[relay]\ninline_concurrency = {inline}", 1))
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(path), "--threads", threads],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    message = f"relay.inline_concurrency: at most half of --threads ({inline} inline of {threads} threads)"
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("flag", ["--delivery-processes", "--workers", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_serve_refuses_a_bad_process_count_naming_the_flag(tmp_path: Path, flag: str, value: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(GOOD)
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(path), flag, value],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2  # argparse's usage error, before anything starts
    assert flag in result.stderr, result.stderr
