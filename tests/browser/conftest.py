"""Browser fixtures: Chromium, the demo pages served from their own origin, a relay per test.

The pages (``static/demo``) are served by a small thread on ``pages_port`` (the origin the test
campaigns allow), so every event crosses origins exactly as on a real landing page: the page is
``http://127.0.0.1:<pages_port>``, the SDK and the endpoint are on the relay's port. The relay and
the sandbox are the real processes of ``tests/conftest.py``; the sandbox knows the ``cmp_test``
campaign only, so the pages are opened with ``?cid=cmp_test&relay=<relay origin>``.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Generator, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode, urlsplit

import pluggy
import pytest

from bench.chromium import launch_args
from tests.conftest import campaigns_toml

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "static" / "demo"
_LOOPBACK_ORIGIN = re.compile(r"^http://127\.0\.0\.1:\d{1,5}$")


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """The system Chromium (Playwright cannot download its own here); Playwright's when absent."""
    return launch_args(**browser_type_launch_args)


class _PagesHandler(SimpleHTTPRequestHandler):
    """Static files; csp.html gets the relay origin (from ?relay=) in its CSP in place of RELAY_ORIGIN;
    a page a test wrote (``written_page``) at its path."""

    written: ClassVar[dict[str, bytes]] = {}  # path -> HTML

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        url = urlsplit(self.path)
        if url.path in self.written:
            self._html(self.written[url.path])
        elif url.path.endswith("/csp.html"):
            relay = parse_qs(url.query).get("relay", [""])[0]
            origin = relay if _LOOPBACK_ORIGIN.match(relay) else ""
            self._html((DEMO / "csp.html").read_text().replace("RELAY_ORIGIN", origin).encode())
        else:
            super().do_GET()

    def _html(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def pages(pages_listener: socket.socket, pages_port: int) -> Iterator[str]:
    """The origin serving static/demo, e.g. ``http://127.0.0.1:PORT`` (on the allowed pages_port)."""
    handler = partial(_PagesHandler, directory=str(DEMO))
    server = ThreadingHTTPServer(("127.0.0.1", pages_port), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = pages_listener  # bound since the session began: see tests/conftest.py
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{pages_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def written_page(pages: str) -> Iterator[Callable[[str, str], str]]:
    """``written_page(path, html)``: serve ``html`` at ``path`` of the pages origin; returns its URL.

    From the loopback server itself: Chromium lets a page reach the loopback relay only if the page
    came from a loopback address (a page fulfilled by ``page.route`` is refused)."""
    paths: list[str] = []

    def write(path: str, html: str) -> str:
        _PagesHandler.written[path] = html.encode()
        paths.append(path)
        return pages + path

    yield write
    for path in paths:
        _PagesHandler.written.pop(path, None)


def sdk_campaigns(pages_port: int, **sdk: Any) -> str:
    """The shared test campaigns, with an [sdk] table for cmp_test (call_event on by default)."""
    sdk.setdefault("call_event", "call_clicked")
    lines = [f"{key} = {_toml(value)}" for key, value in sdk.items()]
    return campaigns_toml(pages_port) + "\n[campaigns.cmp_test.sdk]\n" + "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return (
            '"' + "".join(c if c.isascii() and c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'
        )
    return repr(value)


SDK_LOADED = "() => window.pingtree && window.pingtree.loaded"


class Funnel:
    """URLs of the demo pages for one relay, and small page helpers."""

    def __init__(self, pages: str, relay: Any) -> None:
        self.pages = pages
        self.relay = relay

    def url(self, page: str, **params: str) -> str:
        query = {"relay": self.relay.url, "cid": "cmp_test", **params}
        return f"{self.pages}/{page}?{urlencode(query)}"

    def open(self, page: Any, name: str, **params: str) -> None:
        """Load demo page ``name`` in ``page`` and wait until the SDK has started."""
        page.goto(self.url(name, **params))
        page.wait_for_function(SDK_LOADED)


@pytest.fixture
def console(page: Any) -> Iterator[list[str]]:
    """Every console line of the test's page; printed when the test fails."""
    lines: list[str] = []
    page.on("console", lambda msg: lines.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: lines.append(f"pageerror: {exc}"))
    yield lines


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        lines = item.funcargs.get("console") if hasattr(item, "funcargs") else None
        if lines:
            report.sections.append(("browser console", "\n".join(lines[-80:])))
        sandbox = item.funcargs.get("sandbox") if hasattr(item, "funcargs") else None
        if sandbox is not None:
            try:
                arrived = [e.get("body") for e in sandbox.events()]
            except Exception as exc:  # noqa: BLE001 - a report must not fail
                arrived = [f"(could not read the sandbox: {exc})"]
            report.sections.append(("what the sandbox received", "\n".join(map(str, arrived)) or "(nothing)"))
