"""Pingtree unreachable: the engine stops sending every due event into a refused port, probes one
at a time, and drains at full speed the moment Pingtree answers again (server/outbox/dispatcher.py).

A real SQLite store, the real forwarder, and a real upstream process killed and restarted on its port.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from server.forwarder import AsyncForwarder, Attempt
from server.outbox import dispatcher as dispatcher_module
from server.outbox import open_store
from server.outbox.dispatcher import UNREACHABLE_AFTER, Dispatcher, Reachability
from tests.conftest import wait_for
from tests.test_delivery_engine import Upstream, backlog_of

REFUSED = Attempt(None, error="connect: ConnectError")


def test_unreachable_after_enough_connection_failures_in_a_row_and_back_at_the_first_answer() -> None:
    clock = [100.0]
    reach = Reachability(clock=lambda: clock[0])
    for _ in range(UNREACHABLE_AFTER - 1):
        assert reach.saw(REFUSED) is None
    assert reach.saw(Attempt(503, uncertain=True)) is None  # an answer, even a 5xx: it is reachable
    assert reach.failures == 0 and not reach.down
    for _ in range(UNREACHABLE_AFTER - 1):
        reach.saw(REFUSED)
    assert reach.saw(Attempt(None, error="connect: ConnectTimeout")) == "down" and reach.down
    assert reach.saw(REFUSED) is None  # still down: said once
    clock[0] += 12
    assert reach.saw(Attempt(None, error="ReadTimeout", uncertain=True)) == "up"  # it connected
    assert not reach.down


def test_a_full_pool_of_ours_says_nothing_about_pingtree() -> None:
    reach = Reachability()
    for _ in range(UNREACHABLE_AFTER * 2):
        reach.saw(Attempt(None, error="connect: PoolTimeout"))
    assert not reach.down and not Attempt(None, error="connect: PoolTimeout").unreachable


class CountingForwarder:
    """The real forwarder, with each send's start time, concurrency and outcome recorded."""

    def __init__(self, inner: AsyncForwarder) -> None:
        self.inner = inner
        self.sends: list[tuple[float, int, str | None]] = []
        self.in_flight = 0
        self.lock = threading.Lock()

    @property
    def last(self) -> tuple[float, bool, str] | None:
        return self.inner.last

    async def send(self, cid: str, body: dict[str, Any]) -> Attempt:
        self.in_flight += 1
        started, concurrent = time.monotonic(), self.in_flight
        try:
            attempt = await self.inner.send(cid, body)
        finally:
            self.in_flight -= 1
        with self.lock:
            self.sends.append((started, concurrent, attempt.error))
        return attempt

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_an_unreachable_pingtree_gets_one_probe_at_a_time_and_the_backlog_drains_when_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "PROBE_SECONDS", 0.2)
    upstream = Upstream(tmp_path / "upstream.log")
    url = upstream.url
    upstream.kill()  # its port now refuses every connection
    store_url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    backlog_of(store_url, [f"txn_reach_{uuid.uuid4().hex[:8]}_{i}" for i in range(300)])
    store = open_store(store_url)
    forwarders: list[CountingForwarder] = []

    def factory(n: int) -> CountingForwarder:
        forwarders.append(CountingForwarder(AsyncForwarder(url, timeout=5, max_connections=n)))
        return forwarders[0]

    # retry_base small: without the probe rule, each of the 300 would be sent again every few
    # hundred ms into the refused port.
    engine = Dispatcher(store, forwarder_factory=factory, retry_base=0.05, retry_cap=0.2)
    engine.start(100)
    try:
        wait_for(
            lambda: engine.reachability.down, timeout=30, message="the engine to find Pingtree unreachable"
        )
        sends = forwarders[0].sends  # appended as each send ends: the batch in flight at the trip too
        down_since = engine.reachability.down_since
        assert down_since is not None

        def started_since_the_trip() -> list[tuple[float, int, str | None]]:
            return sorted(send for send in list(sends) if send[0] > down_since)

        wait_for(lambda: len(started_since_the_trip()) >= 4, timeout=30, message="four probes")
        probes = started_since_the_trip()
        # No batch after the trip: one event at a time, PROBE_SECONDS apart (a slow machine only
        # spaces them more). Both clocks are time.monotonic.
        assert all(concurrent == 1 for _, concurrent, _ in probes), probes
        gaps = [b[0] - a[0] for a, b in zip(probes, probes[1:], strict=False)]
        assert all(gap >= 0.18 for gap in gaps), gaps
        upstream.start()  # back on the same port
        wait_for(
            lambda: store.stats().counts["delivered"] == 300, timeout=60, message="the backlog delivered"
        )
        assert not engine.reachability.down
        assert upstream.stats()["requests"] == 300  # each once: the refused probes never reached it
    finally:
        engine.stop()
        upstream.stop()
        store.close()


def test_a_dead_staging_upstream_says_nothing_about_pingtree(tmp_path: Path) -> None:
    """Test events go to the staging upstream (server/staging.py): its refusals must not make the
    engine think Pingtree is down and drip the real events out one a second."""
    store_url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    backlog_of(
        store_url,
        [f"txn_staging_{uuid.uuid4().hex[:8]}_{i}" for i in range(UNREACHABLE_AFTER * 3)],
        test=True,
    )
    store = open_store(store_url)
    attempted: list[str] = []

    class StagingDown:
        last = None

        async def send(self, cid: str, body: dict[str, Any]) -> Attempt:
            attempted.append(body["transaction_id"])
            return REFUSED

        async def aclose(self) -> None:
            pass

    engine = Dispatcher(store, forwarder_factory=lambda n: StagingDown(), retry_base=30, retry_cap=60)
    engine.start(100)
    try:
        wait_for(lambda: len(set(attempted)) == UNREACHABLE_AFTER * 3, timeout=30, message="each tried once")
        assert not engine.reachability.down and engine.reachability.failures == 0
    finally:
        engine.stop()
        store.close()
