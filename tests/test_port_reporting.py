"""``--port 0 --port-file PATH``: a server binds a port the kernel picks and says which (server/listening.py).

Tests and benchmarks start their servers this way (bench/servers.py ``Server``): no port is picked,
closed and bound again later, which raced under ``pytest -n 2``. Here the installed
``pingtree-relay`` command itself, for each server it runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.servers import wait_for
from server.listening import bind_listener, read_port_file, write_port_file

CONFIG = """
[relay]
upstream_url = "http://127.0.0.1:1"
store = "sqlite:///{store}"
[relay.rate_limits]
per_ip = ""
per_campaign = ""
[campaigns.cmp_test]
allowed_origins = ["https://www.example.com"]
[campaigns.cmp_test.events.quote_viewed]
inline = true
"""


def test_the_port_file_holds_a_whole_number_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "relay.port"
    assert read_port_file(path) is None
    path.write_text("123")  # what a reader could see mid-write without the rename: not a port yet
    assert read_port_file(path) is None
    write_port_file(path, 45678)
    assert path.read_text() == "45678\n" and read_port_file(path) == 45678
    assert [p.name for p in tmp_path.iterdir()] == ["relay.port"]  # no partial file left behind


def test_a_taken_port_is_refused_with_a_sentence(tmp_path: Path) -> None:
    with bind_listener("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "relay.toml"
        config.write_text(CONFIG.replace("{store}", str(tmp_path / "relay.sqlite3")))
        done = subprocess.run(
            [_command(), "serve", "--config", str(config), "--port", str(port), "--port-file", "p"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "p").exists()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.parametrize("command", ["serve", "sandbox", "demo"])
def test_port_zero_binds_a_free_port_and_reports_it(
    tmp_path: Path, started: list[subprocess.Popen[bytes]], command: str
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG.replace("{store}", str(tmp_path / "relay.sqlite3")))
    port_file = tmp_path / f"{command}.port"
    args = [] if command == "demo" else ["--config", str(config)]
    with open(tmp_path / f"{command}.log", "wb") as log:
        started.append(
            subprocess.Popen(
                [_command(), command, *args, "--port", "0", "--port-file", str(port_file)],
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)},
                start_new_session=True,
            )
        )
    proc = started[0]

    def reported() -> int | None:
        assert proc.poll() is None, (tmp_path / f"{command}.log").read_text()
        return read_port_file(port_file)

    port = wait_for(reported, timeout=60, message=f"{command} to write its port file")
    assert port > 0
    with pytest.raises(OSError):  # the port is the server's: it is bound, not just picked
        socket.create_server(("127.0.0.1", port)).close()

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout=60, message=f"{command} to answer on the reported port")
    # What it prints names the port it got, not the 0 it was given.
    logged = (tmp_path / f"{command}.log").read_text()
    assert re.search(rf"http://127\.0\.0\.1:{port}\b", logged), logged
    if command == "demo":  # its config names its own port: built after the bind, from the real one
        assert httpx.get(f"http://127.0.0.1:{port}/sandbox/healthz", timeout=5).status_code == 200
        assert (tmp_path / f"pingtree-relay-demo-{port}.sqlite3").exists()


def _command() -> str:
    """The installed ``pingtree-relay`` (tests run with the venv's bin first on PATH)."""
    found = shutil.which("pingtree-relay")
    assert found, "pingtree-relay is not installed: pip install ."
    return found
