"""/readyz's upstream state is the box's: every worker of one serve answers with the latest attempt
any of them made (server/upstream_state.py), not with its own."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from server.upstream_state import UpstreamState
from tests.conftest import RelayFactory, Sandbox, wait_for


def test_two_processes_share_one_outcome(tmp_path: Path) -> None:
    one, other = UpstreamState(str(tmp_path)), UpstreamState(str(tmp_path))  # as two workers would
    assert other.read() is None
    one.record(False, "connect: ConnectError")
    seen = other.read()
    assert seen is not None and (seen.answered, seen.detail) == (False, "connect: ConnectError")
    other.record(True, "HTTP 200")
    assert one.read() is not None and one.read().detail == "HTTP 200"  # type: ignore[union-attr]


def test_without_a_shared_directory_it_is_the_processs_own() -> None:
    state = UpstreamState(None)
    assert state.read() is None
    state.record(True, "HTTP 200")
    assert state.read() == state.last


def readiness_by_worker(relay_url: str) -> dict[str, set[tuple[str, str]]]:
    """(state, detail) answers by worker, until two workers have answered (fresh connections take
    turns). The worker is told by its request ids' per-process prefix (server/logs.py)."""
    answers: dict[str, set[tuple[str, str]]] = {}

    def ask() -> bool:
        response = httpx.get(relay_url + "/readyz", headers={"Connection": "close"}, timeout=5)
        upstream = response.json()["upstream"]
        answers.setdefault(response.headers["X-Request-Id"][:24], set()).add(
            (upstream["state"], upstream["detail"])
        )
        return len(answers) >= 2

    wait_for(ask, interval=0.01, message="both workers to answer /readyz")
    return answers


def test_every_worker_reports_the_boxs_latest_attempt(relay_factory: RelayFactory, sandbox: Sandbox) -> None:
    relay = relay_factory(workers=2)
    assert set().union(*readiness_by_worker(relay.url).values()) == {("unknown", "no attempt yet")}
    # One attempt, by one worker (a refusal is final: no retry by the other).
    sandbox.fault(status=400, message="Campaign is paused", count=1)
    refused = relay.post({"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex})
    assert refused.status_code == 400, refused.text
    by_worker = readiness_by_worker(relay.url)
    assert all(seen == {("ok", "HTTP 400")} for seen in by_worker.values()), by_worker
