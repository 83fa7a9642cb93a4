"""Take the README's screenshots from the real running demo (nothing drawn, nothing mocked).

Starts ``python -m server.cli demo`` on a free port, walks a few visitors through the demo funnel in
Chromium (landing -> multi-step form -> thank-you page with its conversion), lets Pingtree's sandbox
refuse one event so the dashboard has a dead letter to show, then logs in to the dashboard.
Writes ``docs/img/demo.png`` (the thank-you page, conversion recorded), ``docs/img/dashboard.png``
and ``docs/img/debug-panel.png`` (the ``?pt_debug=1`` panel on the thank-you page).

    scripts/screenshots            # or: python scripts/screenshots.py [--out docs/img] [--only debug-panel]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a script: the checkout's bench/ is not installed
from bench.chromium import launch_args  # noqa: E402

LANDING_QUERY = "?utm_source=google&utm_campaign=spring&sub1=ad42&pid=src_demo"
VIEWPORT = {"width": 1280, "height": 860}
DEMO_CLIP = {"x": 0, "y": 0, "width": 1280, "height": 540}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def start_demo(port: int, log: Path) -> subprocess.Popen[bytes]:
    # The demo keeps its outbox in the temp dir by port: start from an empty one.
    for suffix in ("", "-wal", "-shm"):
        Path(tempfile.gettempdir(), f"pingtree-relay-demo-{port}.sqlite3{suffix}").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "demo", "--port", str(port)],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def up() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    until(up, 30, "the demo to start")
    return proc


def visitor(browser: Browser, base: str, *, convert: bool) -> Page:
    """One visitor through the funnel; returns the last page (left open for a screenshot)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{base}/demo/{LANDING_QUERY}")
    page.click("#get-quote")
    page.wait_for_url("**/form.html*")
    page.click("#next-1")
    page.click("#next-2")
    if not convert:
        return page
    page.click("#submit")
    page.wait_for_url("**/thanks.html*")
    page.locator("#conversion-id").wait_for(state="visible", timeout=15_000)
    return page


def dashboard(browser: Browser, base: str, out: Path) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{base}/admin/")
    page.fill("#token", "demo-admin-token")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/admin/")

    def settled() -> bool:  # nothing left in flight: the picture shows final states
        stats = page.request.get(f"{base}/admin/feed.json").json()["stats"]
        return stats["counts"]["pending"] == 0

    until(settled, 30, "every event to be delivered or dead")
    page.reload()
    page.screenshot(path=str(out / "dashboard.png"), full_page=True)
    context.close()


def debug_panel(browser: Browser, base: str, out: Path) -> None:
    """A visitor from a Google ad reaches the thank-you page with ?pt_debug=1: the panel shows the
    attribution and where it came from, the conversion's answer, a refusal, and an event held offline."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{base}/demo/{LANDING_QUERY}&gclid=Cj0KCQiA-demo")
    page.wait_for_function("() => window.pingtree && window.pingtree.loaded")
    page.goto(f"{base}/demo/thanks.html?pt_debug=1")
    page.locator("#conversion-id").wait_for(state="visible", timeout=15_000)
    page.evaluate("() => pingtree('set', { sub2: 'thanks-upsell' })")
    page.click("#upsell")  # sale_completed again: Pingtree refuses the duplicate
    panel = page.locator("#pingtree-debug")
    until(lambda: "refused" in panel.inner_text(), 20, "the refusal in the panel")
    context.set_offline(True)
    page.evaluate("() => { pingtree('event', 'call_clicked'); }")
    until(lambda: "held: offline" in panel.inner_text(), 20, "the held event in the panel")
    page.screenshot(path=str(out / "debug-panel.png"))
    context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--only", choices=("debug-panel",), help="take this picture only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="pingtree-demo-", suffix=".log")[1])
    proc = start_demo(port, log)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(**launch_args())
            debug_panel(browser, base, out)
            if args.only:
                browser.close()
                return 0
            for convert in (False, True, False, True):
                visitor(browser, base, convert=convert).context.close()
            # Pingtree refuses the next event (as it would for a misconfigured campaign): a dead letter.
            fault = {"status": 400, "message": "Invalid pid for this campaign", "count": 1}
            httpx.post(f"{base}/sandbox/_sandbox/faults", json=fault, timeout=5).raise_for_status()
            visitor(browser, base, convert=False).context.close()
            shown = visitor(browser, base, convert=True)
            # The card and its answer; the empty page below adds nothing.
            shown.screenshot(path=str(out / "demo.png"), clip=DEMO_CLIP)
            shown.context.close()
            dashboard(browser, base, out)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    print(
        f"wrote {out / 'demo.png'}, {out / 'dashboard.png'} and {out / 'debug-panel.png'} (demo log: {log})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
