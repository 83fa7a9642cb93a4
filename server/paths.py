"""Where the bundled data lives: at the top of a source checkout, or inside the installed package."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """``js_templates`` or ``static``: ``server/NAME`` in a wheel, ``../NAME`` in a checkout."""
    installed = _HERE / name
    if installed.is_dir():
        return installed
    return _HERE.parent / name


JS_TEMPLATES = data_dir("js_templates")
STATIC = data_dir("static")
