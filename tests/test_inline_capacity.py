"""The inline attempt uses spare capacity only (server/relay.py, ``Relay._inline_worthwhile``).

A page gets its conversion_id in the answer when the relay can afford an attempt upstream there and
then; while the process is busy (its CPU clock says so) or the engine has a backlog, the answer is
202 from the store at once and the engine delivers. The relay runs in process with a real SQLite
store and the real sandbox; the CPU clocks are the one part given by the test, so "busy" is exact.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import server.relay
from server import create_app
from server.config import parse_config
from server.cpu_load import CpuLoad
from tests.conftest import Sandbox, wait_for


class CpuClock:
    """A CPU clock that the test winds: ``burn(s)`` = the process ran for ``s``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds

    def burn(self, seconds: float) -> None:
        self.seconds += seconds


@pytest.fixture
def every_accept_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refresh the capacity view on every accept (it is at most 0.25 s stale otherwise)."""
    monkeypatch.setattr(server.relay, "CAPACITY_CHECK_SECONDS", 0.0)


@pytest.fixture
def relay_app(tmp_path: Path, sandbox: Sandbox) -> Iterator[Callable[..., Any]]:
    relays: list[Any] = []

    def make(cpu_load: CpuLoad | None, start_delivery: bool = False) -> Any:
        config = parse_config(
            {
                "relay": {
                    "upstream_url": sandbox.url,
                    "store": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
                    "retry_base_seconds": 0.05,
                    "rate_limits": {"per_ip": "", "per_campaign": ""},
                },
                "campaigns": {
                    "cmp_test": {
                        "allowed_origins": ["https://www.example.com"],
                        "events": {"quote_viewed": {}},
                    }
                },
            }
        )
        app = create_app(config, start_delivery=start_delivery, cpu_load=cpu_load)
        relays.append(app.extensions["relay"])
        return app.test_client()

    yield make
    for relay in relays:
        relay.close()


def post(client: Any) -> tuple[int, dict[str, Any], str]:
    t = f"txn_{uuid.uuid4().hex}"
    response = client.post(
        "/api/event/cmp_test",
        json={"event_id": "quote_viewed", "transaction_id": t},
        headers={"Origin": "https://www.example.com"},
    )
    return response.status_code, response.json, t


@pytest.mark.usefixtures("every_accept_checks")
def test_an_idle_process_attempts_inline_and_answers_with_pingtree_s_answer(
    relay_app: Callable[..., Any], sandbox: Sandbox
) -> None:
    clock = CpuClock()
    client = relay_app(CpuLoad(clock))
    for _ in range(3):
        clock.burn(0.0001)  # a few hundred microseconds between requests: idle
        status, body, t = post(client)
        assert status == 200 and body["type"] == "success", body
        assert len(sandbox.events(transaction_id=t)) == 1


@pytest.mark.usefixtures("every_accept_checks")
def test_a_busy_process_answers_202_from_the_store_and_the_engine_delivers(
    relay_app: Callable[..., Any], sandbox: Sandbox
) -> None:
    clock = CpuClock()
    client = relay_app(CpuLoad(clock), start_delivery=True)
    post(client)  # the first accept takes the clocks' first reading
    clock.burn(3600.0)  # far more CPU than wall time since: busy, whatever the machine's speed
    status, body, t = post(client)
    assert status == 202 and body["type"] == "queued", body
    # Not lost: the engine delivers it, once.
    wait_for(lambda: len(sandbox.events(transaction_id=t)) == 1, message="the engine delivered the event")
    # Busy no longer (no CPU used since): the next event is attempted inline again.
    status, body, t = post(client)
    assert status == 200 and body["type"] == "success", body


def test_without_a_cpu_clock_a_process_busy_with_other_work_still_attempts_inline(
    relay_app: Callable[..., Any], sandbox: Sandbox, every_accept_checks: None
) -> None:
    """Tests and embedders pass no CpuLoad: the pytest process is always busy, and that is not load."""
    client = relay_app(None)
    for _ in range(3):
        status, body, t = post(client)
        assert status == 200 and body["type"] == "success", body


def test_cpu_load_compares_the_process_clock_with_the_wall_time_between_two_readings() -> None:
    wall, cpu = CpuClock(), CpuClock()
    load = CpuLoad(cpu, wall_clock=wall)
    assert load.busy(0.5) is False  # the first reading only starts the clocks
    wall.burn(1.0)
    cpu.burn(0.49)
    assert load.busy(0.5) is False
    wall.burn(1.0)
    cpu.burn(0.5)
    assert load.busy(0.5) is True
    assert load.busy(0.5) is False  # no wall time passed: nothing to judge


def test_serve_s_workers_judge_their_own_cpu(tmp_path: Path, sandbox: Sandbox) -> None:
    """The app ``serve`` builds in each worker carries the process's CPU clock (the rule above is
    only as good as this wiring); ``create_app``'s default, for tests and embedders, carries none."""
    import time

    from server.cli import worker_app

    config = parse_config(
        {
            "relay": {"upstream_url": sandbox.url, "store": f"sqlite:///{tmp_path / 'outbox.sqlite3'}"},
            "campaigns": {"cmp_test": {"allowed_origins": ["https://www.example.com"]}},
        }
    )
    served = worker_app(config).extensions["relay"]
    plain = create_app(config, start_delivery=False).extensions["relay"]
    try:
        assert isinstance(served.cpu_load, CpuLoad)
        assert served.cpu_load.process_clock is time.process_time
        assert plain.cpu_load is None
    finally:
        served.close()
        plain.close()
