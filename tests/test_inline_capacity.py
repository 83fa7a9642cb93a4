"""The inline attempt uses spare capacity only (server/relay.py, ``Relay._inline_worthwhile``).

A page gets its conversion_id in the answer when the relay can afford an attempt upstream there and
then; while the process is busy (its CPU clock says so) or the engine has a backlog, the answer is
202 from the store at once and the engine delivers. The relay runs in process with a real SQLite
store and the real sandbox; the CPU clocks are the one part given by the test, so "busy" is exact.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

import server.relay
import server.worker
from server.cli import worker_app
from server.config import load_config
from server.cpu_load import CpuLoad
from tests.conftest import InProcessRelay, InProcessRelayFactory, Sandbox, wait_for


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


def post(relay: InProcessRelay) -> tuple[int, dict[str, Any], str]:
    t = f"txn_{uuid.uuid4().hex}"
    response = relay.post({"event_id": "quote_viewed", "transaction_id": t})
    return response.status_code, response.json(), t


@pytest.mark.usefixtures("every_accept_checks")
def test_an_idle_process_attempts_inline_and_answers_with_pingtree_s_answer(
    app_relay_factory: InProcessRelayFactory, sandbox: Sandbox
) -> None:
    clock = CpuClock()
    relay = app_relay_factory(app_options={"cpu_load": CpuLoad(clock)})
    for _ in range(3):
        clock.burn(0.0001)  # a few hundred microseconds between requests: idle
        status, body, t = post(relay)
        assert status == 200 and body["type"] == "success", body
        assert len(sandbox.events(transaction_id=t)) == 1


@pytest.mark.usefixtures("every_accept_checks")
def test_a_busy_process_answers_202_from_the_store_and_the_engine_delivers(
    app_relay_factory: InProcessRelayFactory, sandbox: Sandbox
) -> None:
    clock = CpuClock()
    relay = app_relay_factory(app_options={"cpu_load": CpuLoad(clock), "start_delivery": True})
    post(relay)  # the first accept takes the clocks' first reading
    clock.burn(3600.0)  # far more CPU than wall time since: busy, whatever the machine's speed
    status, body, t = post(relay)
    assert status == 202 and body["type"] == "queued", body
    # Not lost: the engine delivers it, once.
    wait_for(lambda: len(sandbox.events(transaction_id=t)) == 1, message="the engine delivered the event")
    # Busy no longer (no CPU used since): the next event is attempted inline again.
    status, body, t = post(relay)
    assert status == 200 and body["type"] == "success", body


@pytest.mark.usefixtures("every_accept_checks")
def test_on_the_worker_s_loop_thread_the_relay_never_waits_upstream(
    app_relay_factory: InProcessRelayFactory, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """server/worker.py runs a request on its event loop's thread when the relay said it would not
    try it inline; if the relay changed its mind meanwhile, the loop must still not wait on Pingtree."""
    relay = app_relay_factory(app_options={"start_delivery": True})
    status, body, t = post(relay)
    assert status == 200, body  # idle, on an ordinary thread: inline
    monkeypatch.setattr(server.worker, "_loop_threads", {threading.get_ident()})  # this thread is a loop's
    assert not server.worker.may_wait()
    status, body, t = post(relay)
    assert status == 202 and body["type"] == "queued", body
    wait_for(lambda: len(sandbox.events(transaction_id=t)) == 1, message="the engine delivered the event")


@pytest.mark.usefixtures("every_accept_checks")
def test_the_worker_is_asked_for_a_thread_only_while_an_inline_attempt_would_be_made(
    app_relay_factory: InProcessRelayFactory,
) -> None:
    clock, wall = CpuClock(), CpuClock()  # both wound by the test: "busy" is exact
    relay = app_relay_factory(app_options={"cpu_load": CpuLoad(clock, wall)})
    wants_thread = relay.app.extensions["wants_thread"]
    inline = relay.app.extensions["relay"]._inline
    environ = {"PATH_INFO": "/api/event/cmp_test", "REQUEST_METHOD": "POST"}
    assert wants_thread(environ) is True  # the first look starts the CPU clocks: not busy
    clock.burn(0.0001)
    wall.burn(1.0)
    assert wants_thread(environ) is True  # idle, a slot free
    taken = [inline.take() for _ in range(relay.app.extensions["relay"].config.relay.inline_concurrency)]
    assert all(taken) and not inline.take()
    assert wants_thread(environ) is False  # every slot taken: it would be answered 202 anyway
    for _ in taken:
        inline.release()
    clock.burn(0.0001)
    wall.burn(1.0)
    assert wants_thread(environ) is True  # a slot free again
    clock.burn(1.0)
    wall.burn(1.0)
    assert wants_thread(environ) is False  # busy: a core's worth of CPU in a second


def test_without_a_cpu_clock_a_process_busy_with_other_work_still_attempts_inline(
    app_relay_factory: InProcessRelayFactory, every_accept_checks: None
) -> None:
    """Tests and embedders pass no CpuLoad: the pytest process is always busy, and that is not load."""
    relay = app_relay_factory()
    for _ in range(3):
        status, body, t = post(relay)
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


def test_serve_s_workers_judge_their_own_cpu(app_relay_factory: InProcessRelayFactory) -> None:
    """The app ``serve`` builds in each worker carries the process's CPU clock (the rule above is
    only as good as this wiring); ``create_app``'s default, for tests and embedders, carries none."""
    plain = app_relay_factory()
    served = worker_app(load_config(str(plain.config_path))).extensions["relay"]
    try:
        assert isinstance(served.cpu_load, CpuLoad)
        assert served.cpu_load.process_clock is time.process_time
        assert plain.app.extensions["relay"].cpu_load is None
    finally:
        served.close()
