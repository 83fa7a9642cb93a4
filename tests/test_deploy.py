"""The deployment files shipped in deploy/: checked by systemd itself (``systemd-analyze verify``),
and their command lines are ones this relay accepts. Plus the LICENSE and CHANGELOG."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from server.build import version
from server.cli import build_parser
from tests.conftest import ROOT, write_relay_config

DEPLOY = ROOT / "deploy"
UNITS = ("pingtree-relay.service", "pingtree-relay-purge.service", "pingtree-relay-purge.timer")
INSTALLED = "/opt/pingtree-relay/bin/pingtree-relay"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text())
    return parser


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:  # a visible skip, never a silent pass: scripts/install-system-deps installs it
        pytest.skip(
            "systemd-analyze is not installed (apt-get install systemd): the unit files are unchecked"
        )
    return tool


def verify(tmp_path: Path, texts: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on copies whose ExecStart points at this venv's pingtree-relay
    (verify refuses a command that does not exist, and /opt/pingtree-relay is not installed here)."""
    binary = shutil.which("pingtree-relay")
    assert binary, "pingtree-relay is not on PATH (pip install .)"
    for name, text in texts.items():
        (tmp_path / name).write_text(text.replace(INSTALLED, binary))
    return subprocess.run(
        [systemd_analyze(), "verify", *(str(tmp_path / n) for n in texts)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_systemd_accepts_the_units_without_a_warning(tmp_path: Path) -> None:
    done = verify(tmp_path, {name: (DEPLOY / name).read_text() for name in UNITS})
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_check_can_fail(tmp_path: Path) -> None:
    """The same check on a unit with a typo and a bad value: systemd complains (the test is live)."""
    text = (
        (DEPLOY / UNITS[0])
        .read_text()
        .replace("ProtectHome=yes", "ProtectHome=yess")
        .replace("Restart=on-failure", "Restartt=on-failure")
    )
    done = verify(tmp_path, {UNITS[0]: text})
    assert "Restartt" in done.stderr and "yess" in done.stderr


def test_the_service_runs_serve_with_a_config_in_etc_and_reloads_with_sighup() -> None:
    service = unit("pingtree-relay.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == INSTALLED
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("serve", "/etc/pingtree-relay/relay.toml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (
        service["StateDirectory"] == "pingtree-relay"
        and service["WorkingDirectory"] == "/var/lib/pingtree-relay"
    )
    for hardening in (
        "NoNewPrivileges",
        "ProtectSystem",
        "PrivateTmp",
        "ProtectHome",
        "RestrictAddressFamilies",
    ):
        assert service[hardening], hardening
    assert (
        "sqlite:////var/lib/pingtree-relay/outbox.sqlite3" in (DEPLOY / "pingtree-relay.service").read_text()
    )


def test_the_timer_purges_old_delivered_events_with_a_command_that_works(tmp_path: Path) -> None:
    timer = unit("pingtree-relay-purge.timer")["Timer"]
    assert timer["OnCalendar"] == "daily" and timer["Persistent"] == "true"
    argv = shlex.split(unit("pingtree-relay-purge.service")["Service"]["ExecStart"])
    assert argv[0] == INSTALLED and argv[1:3] == ["outbox", "purge"] and "--older-than" in argv
    config = write_relay_config(
        tmp_path / "relay.toml",
        upstream="http://127.0.0.1:1",
        store=f"sqlite:///{tmp_path / 'o.sqlite3'}",
        campaigns="",
    )
    args = [str(config) if a == "/etc/pingtree-relay/relay.toml" else a for a in argv[1:]]
    done = subprocess.run(["pingtree-relay", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "purged 0 delivered events (last updated more than 30d ago)\n"


def test_license_and_changelog() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {version()}" in changelog or f"## [{version()}]" in changelog
