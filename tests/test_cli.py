"""The command line: serve shuts down gracefully, demo runs with no config, sign and snippet print."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from server.validation import sign_revenue
from tests.conftest import ROOT, Relay, RelayFactory, ServerProcess, campaigns_toml, wait_for


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_serve_exits_cleanly_on_sigterm(relay: Relay) -> None:
    assert relay.proc is not None
    code = relay.stop()
    assert code == 0, relay.log()


def test_demo_runs_without_config(tmp_path: Path) -> None:
    demo = ServerProcess(["demo"], tmp_path / "demo.log").start()
    try:
        base = demo.url
        page = httpx.get(base + "/demo/")
        assert page.status_code == 200 and "demo.js" in page.text
        assert "cmp_demo" in httpx.get(base + "/demo/config.js").text
        assert httpx.get(base + "/sdk/cmp_demo.js").status_code == 200
        assert httpx.get(base + "/sandbox/healthz").status_code == 200
        t = f"txn_{uuid.uuid4()}"
        response = httpx.post(
            base + "/api/event/cmp_demo",
            headers={"Origin": base},
            json={"event_id": "sale_completed", "transaction_id": t, "amount": 12},
        )
        assert response.status_code in (200, 202), response.text
        events = wait_for(
            lambda: httpx.get(base + "/sandbox/_sandbox/events", params={"transaction_id": t}).json()[
                "events"
            ],
            message="the demo sandbox to receive the event",
        )
        assert events[0]["body"]["cost"] == 1.25
        assert "relay endpoint" in demo.log()
    finally:
        demo.stop()


def test_sign_matches_the_helper() -> None:
    result = run_cli(
        "sign", "--secret", "k", "--cid", "c", "--transaction-id", "t", "--event-id", "e", "--amount", "12.5"
    )
    assert result.returncode == 0
    assert result.stdout.strip() == sign_revenue("k", "c", "t", "e", "12.50")


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[relay]\n")
    result = run_cli("serve", "--config", str(bad), "--port", "0")
    assert result.returncode != 0 and "relay.upstream_url: required" in result.stderr


def test_serve_banner_names_the_resolved_store_and_logs_the_warnings(
    relay_factory: RelayFactory, pages_port: int
) -> None:
    campaigns = (
        campaigns_toml(pages_port) + '\n[campaigns.cmp_empty]\nallowed_origins = ["https://e.example.com"]\n'
    )
    relay = relay_factory(campaigns)
    log = relay.log()
    assert f"store: SQLite file {relay.store_path})" in log, log
    assert "warning: campaigns.cmp_empty.events: none" in log, log
    assert "warning: campaigns.cmp_test.allowed_origins[2]: *.webflow.io is a hosting platform" in log, log


def test_snippet_prints_the_stable_tag_and_pins_on_request(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        '[relay]\nupstream_url = "http://127.0.0.1:1"\nstore = "sqlite:///outbox.sqlite3"\n'
        'public_url = "https://track.example.com"\n[campaigns.cmp_x.events.view]\n'
    )
    stable = run_cli("snippet", "cmp_x", "--config", str(config))
    assert stable.returncode == 0, stable.stderr
    assert (
        stable.stdout.splitlines()[1]
        == '<script defer src="https://track.example.com/sdk/cmp_x.js"></script>'
    )
    assert not (tmp_path / "sdk-builds").exists()  # nothing to keep for the stable tag

    pinned = run_cli(
        "snippet", "cmp_x", "--config", str(config), "--integrity", "--base-url", "http://r.example"
    )
    assert pinned.returncode == 0, pinned.stderr
    match = re.search(
        r'src="http://r\.example/sdk/cmp_x/v/([0-9a-f]{16})\.js" integrity="sha384-', pinned.stdout
    )
    assert match, pinned.stdout
    # Kept beside the SQLite store, so the relay serves this build even after the config changes.
    assert [p.name for p in (tmp_path / "sdk-builds").glob("*.js")] == [f"cmp_x.{match.group(1)}.js"]

    config.write_text(config.read_text().replace('public_url = "https://track.example.com"\n', ""))
    refused = run_cli("snippet", "cmp_x", "--config", str(config))
    assert refused.returncode == 1 and "--base-url" in refused.stderr


def test_snippet_csp_prints_the_sources_and_no_stub_drops_the_hash(tmp_path: Path) -> None:
    import base64
    import hashlib

    from server.sdk import STUB

    cfg = tmp_path / "relay.toml"
    cfg.write_text('[relay]\nupstream_url = "http://127.0.0.1:1"\n[campaigns.cmp_a.events.lead]\n')
    base = ["snippet", "cmp_a", "--config", str(cfg), "--base-url", "https://track.example.com/"]
    stub_hash = "'sha256-" + base64.b64encode(hashlib.sha256(STUB.encode()).digest()).decode() + "'"
    csp = run_cli(*base, "--csp")
    assert csp.returncode == 0, csp.stderr
    assert csp.stdout.splitlines() == [
        f"script-src {stub_hash} https://track.example.com",
        "connect-src https://track.example.com",
    ]
    bare = run_cli(*base, "--csp", "--no-stub")
    assert bare.stdout.splitlines()[0] == "script-src https://track.example.com"
    tag = run_cli(*base, "--no-stub").stdout.strip()
    assert tag.startswith('<script defer src="https://track.example.com/sdk/cmp_a.js"') and "\n" not in tag
