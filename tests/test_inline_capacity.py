"""The inline attempt uses spare capacity only (server/relay.py, ``Relay._inline_worthwhile``).

A page gets its conversion_id in the answer when the relay can afford an attempt upstream there and
then; while the process is busy (its CPU clock says so) or the engine has a backlog, the answer is
202 from the store at once and the engine delivers. The relay runs in process with a real SQLite
store and the real sandbox; the CPU clocks are the one part given by the test, so "busy" is exact.
"""

from __future__ import annotations

import io
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
from server.worker import WHOLE_BODY
from tests.conftest import InProcessRelay, InProcessRelayFactory, Sandbox, campaigns_toml, wait_for


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


def default_campaigns(pages_port: int) -> str:
    """The test campaigns without the ``inline = true`` the other tests' plain events carry."""
    return campaigns_toml(pages_port).replace("inline = true\n", "")


def test_by_default_only_conversions_are_tried_inline(
    app_relay_factory: InProcessRelayFactory, sandbox: Sandbox, pages_port: int
) -> None:
    """A conversion's answer carries Pingtree's conversion_id, so the caller waits for it; a plain
    event's would carry nothing the caller needs: 202 at once, and the engine delivers it."""
    relay = app_relay_factory(default_campaigns(pages_port), app_options={"start_delivery": True})
    t = f"txn_{uuid.uuid4().hex}"
    plain = relay.post({"event_id": "quote_viewed", "transaction_id": t})
    assert plain.status_code == 202 and plain.json()["type"] == "queued", plain.text
    wait_for(lambda: len(sandbox.events(transaction_id=t)) == 1, message="the engine delivered the event")
    sale = relay.post({"event_id": "sale_completed", "transaction_id": t, "amount": 45})
    assert sale.status_code == 200 and sale.json()["data"]["conversion_id"], sale.text


def test_an_event_s_inline_key_overrides_the_default(
    app_relay_factory: InProcessRelayFactory, sandbox: Sandbox, pages_port: int
) -> None:
    campaigns = (
        default_campaigns(pages_port)
        .replace(
            "[campaigns.cmp_test.events.quote_viewed]\n",
            "[campaigns.cmp_test.events.quote_viewed]\ninline = true\n",
        )
        .replace("conversion = true\n", "conversion = true\ninline = false\n")
    )
    relay = app_relay_factory(campaigns, app_options={"start_delivery": True})
    t = f"txn_{uuid.uuid4().hex}"
    plain = relay.post({"event_id": "quote_viewed", "transaction_id": t})
    assert plain.status_code == 200 and plain.json()["type"] == "success", plain.text
    sale = relay.post({"event_id": "sale_completed", "transaction_id": t, "amount": 45})
    assert sale.status_code == 202 and sale.json()["type"] == "queued", sale.text
    wait_for(lambda: len(sandbox.events(transaction_id=t)) == 2, message="the engine delivered the sale")


def test_the_worker_is_asked_for_a_thread_only_for_a_request_that_may_carry_an_inline_event(
    app_relay_factory: InProcessRelayFactory, pages_port: int
) -> None:
    """The hint reads the path and the worker's buffered body (not parsed); idle, a slot free."""
    campaigns = default_campaigns(pages_port) + '\n[campaigns.cmp_test.sdk]\nendpoint_path = "/p/e"\n'
    relay = app_relay_factory(campaigns)
    wants_thread = relay.app.extensions["wants_thread"]

    def asks(path: str, body: bytes | None = None) -> bool:
        environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "POST"}
        if body is not None:  # as the relay's worker hands it over (a body cut short: none)
            environ["wsgi.input"], environ[WHOLE_BODY] = io.BytesIO(body), body
        return bool(wants_thread(environ))

    sale, view = b'{"event_id":"sale_completed","amount":4}', b'{"event_id": "quote_viewed"}'
    assert asks("/api/event/cmp_test", sale) and not asks("/api/event/cmp_test", view)
    assert asks("/p/e", sale) and not asks("/p/e", view)  # the campaign's first-party endpoint
    assert asks("/api/event/trigger", sale) and not asks("/api/event/trigger", view)
    assert not asks("/api/event/cmp_other", b'{"event_id":"signup"}')  # no event of it is tried inline
    assert not asks("/api/event/cmp_unknown", sale)  # answered 404 on the loop
    assert asks("/api/event/cmp_test")  # a body the hint cannot read: a thread, as before
    assert asks("/postback/cmp_test/ringba") and not asks("/postback/cmp_other/x")
    assert asks("/admin/")  # not an event: as before
    # The routes each path matched are remembered (the app's RouteCache): asked again, the same answers.
    assert ("/api/event/cmp_test", "POST", False) in relay.app.extensions["routes"].matched
    assert asks("/api/event/cmp_test", sale) and not asks("/api/event/cmp_test", view)
    assert not asks("/api/event/cmp_unknown", sale) and asks("/postback/cmp_test/ringba")


def test_the_hint_remembers_a_bounded_number_of_paths(app_relay_factory: InProcessRelayFactory) -> None:
    """A client of random paths cannot grow a worker's memory through the routes it remembers."""
    app = app_relay_factory().app
    hint, routes = app.extensions["wants_thread"], app.extensions["routes"]
    for n in range(routes.SIZE + 10):
        hint({"PATH_INFO": f"/api/event/cmp_{n}", "REQUEST_METHOD": "POST"})
        assert len(routes.matched) <= routes.SIZE
    assert len(routes.matched) == 10  # emptied when full, then filled again


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
