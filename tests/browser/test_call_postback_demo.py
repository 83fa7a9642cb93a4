"""The demo end to end in Chromium: a visitor's transaction id reaches the call platform (Ringba's
tag array, per the docs/postbacks.md recipe), the platform's postback fires, and the call
conversion arrives at the sandbox. Runs the real ``pingtree-relay demo`` process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import SDK_LOADED
from tests.conftest import ServerProcess, wait_for

pytestmark = pytest.mark.browser


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(["demo"], tmp_path / "demo.log").start()
    yield server
    server.kill()


def test_simulated_call_arrives_at_the_sandbox(page: Page, demo: ServerProcess, console: list[str]) -> None:
    page.goto(demo.url + "/demo/thanks.html?pid=src_demo")
    page.wait_for_function(SDK_LOADED)
    expect(page.locator("#tid")).to_be_visible()
    tid = page.locator("#tid").inner_text()
    assert tid
    # The recipe: the transaction id where Ringba's JS tag reads its tags.
    assert page.evaluate("() => window._rgba_tags") == [{"transaction_id": tid}]

    page.get_by_role("button", name="Simulate a completed call").click()
    expect(page.locator("#call-status")).to_contain_text("Call conversion recorded: conv_", timeout=15000)

    def call_events() -> list[dict]:
        r = httpx.get(demo.url + "/sandbox/_sandbox/events", params={"event_id": "call_completed"}, timeout=5)
        return list(r.json()["events"])

    (event,) = wait_for(call_events, message="the call conversion at the sandbox")
    assert event["transaction_id"] == tid and event["cid"] == "cmp_demo"
    assert event["body"]["amount"] == 30.0 and "ip_address" not in event["body"]
    path = next(
        r["path"]
        for r in httpx.get(demo.url + "/sandbox/_sandbox/requests", timeout=5).json()["requests"]
        if (r["body"] or {}).get("event_id") == "call_completed"
    )
    assert path == "/api/event/cmp_demo"
    assert not [line for line in console if "Content Security Policy" in line or "pageerror" in line], console
