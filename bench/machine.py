"""The machine and software versions a run was measured on (named in docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from importlib import metadata
from pathlib import Path


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def describe() -> dict[str, str]:
    """nproc, CPU model, RAM, OS, Python and the versions of what the figures depend on."""
    mem_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    versions = {name: metadata.version(name) for name in ("gunicorn", "flask", "httpx", "redis")}
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "ram": f"{int(mem_kb) / 1024 / 1024:.1f} GiB" if mem_kb.isdigit() else "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        "sqlite": sqlite3.sqlite_version,
        "wrk": _version(["wrk", "--version"]).split(" [")[0],
        "redis-server": _version(["redis-server", "--version"]).split(" sha=")[0],
        "chromium": _version(["/usr/bin/chromium", "--version"]),
    }
