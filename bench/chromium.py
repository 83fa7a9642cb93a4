"""How every browser here is launched: the system Chromium where it is installed (Playwright cannot
download its own browsers on this machine), Playwright's own otherwise. Used by the browser tests,
bench/sdk_weight.py and scripts/screenshots.py."""

from __future__ import annotations

import os
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch_args(**base: Any) -> dict[str, Any]:
    """``base`` (e.g. pytest-playwright's launch args) with the arguments and executable above."""
    args = {**base, "args": CHROMIUM_ARGS}
    if os.path.exists(CHROMIUM):
        args["executable_path"] = CHROMIUM
    return args
