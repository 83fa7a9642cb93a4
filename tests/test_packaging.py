"""The wheel carries the SDK templates and the demo pages, and declares the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("pingtree_relay-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.relative_to(ROOT).as_posix() for p in (ROOT / "js_templates").rglob("*") if p.is_file()}
    static = {p.relative_to(ROOT).as_posix() for p in (ROOT / "static").rglob("*") if p.is_file()}
    assert templates and static
    for path in templates | static:
        assert f"server/{path}" in names, f"{path} is missing from the wheel"
    assert "server/demo.toml" in names
    admin = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "server" / "admin").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "server/admin/templates/admin/base.html" in admin
    for path in admin:
        assert path in names, f"{path} is missing from the wheel"
    assert "server/sandbox/__init__.py" in names and "server/outbox/sqlite.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pingtree-relay = server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
