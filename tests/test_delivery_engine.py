"""Issue 11's engine contract, on SQLite and on Redis, over real processes.

The upstream is ``tests/slow_upstream.py`` in its own process: it holds every answer for a set
delay, counts requests in flight (and their peak) and, like Pingtree, counts an event once however
often it is resent (a resend is answered "Duplicate event"). Relays are ``pingtree-relay serve``
(gunicorn workers plus the supervised ``pingtree-relay deliver``), killed or stopped for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.servers import REPORT_PORT, Server
from server import cli
from server.config import load_config
from server.forwarder import AsyncForwarder, Attempt
from server.outbox import Record, Store, open_store
from server.outbox.dispatcher import Dispatcher
from server.staging import mark
from tests.conftest import Relay, campaigns_toml, make_relay, wait_for, write_relay_config
from tests.store_counting import count_store_writes

pytest_plugins = ["tests.redis_fixture"]

REPO = Path(__file__).resolve().parent.parent


class Upstream(Server):
    """``tests.slow_upstream`` in a process of its own, on a port it binds itself and reports."""

    def __init__(self, log_path: Path) -> None:
        super().__init__([sys.executable, "-m", "tests.slow_upstream", *REPORT_PORT], log_path)
        self.start(timeout=15)

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/_stats", timeout=10).json())

    def delay(self, ms: float) -> None:
        httpx.post(self.url + "/_config", json={"delay_ms": ms}, timeout=5).raise_for_status()

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.kill()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    server = Upstream(tmp_path / "upstream.log")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'relay.sqlite3'}"
    return str(request.getfixturevalue("redis_url"))


RelayFactory = Callable[..., Relay]


@pytest.fixture
def relays(tmp_path: Path, upstream: Upstream, pages_port: int, store_url: str) -> Iterator[RelayFactory]:
    """``serve`` relays on ``store_url`` with ``upstream`` as their Pingtree."""
    started: list[Relay] = []

    def make(**relay_keys: Any) -> Relay:
        relay = make_relay(
            tmp_path, upstream.url, pages_port, store=store_url, name=f"relay{len(started)}", **relay_keys
        )
        started.append(relay)
        return relay.start()

    yield make
    for relay in started:
        relay.kill()


def post_all(relay: Relay, txns: list[str], *, threads: int = 16) -> list[int | None]:
    def one(txn: str) -> int | None:
        try:
            return relay.post({"event_id": "form_submitted", "transaction_id": txn}).status_code
        except httpx.TransportError:
            return None

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, txns))


def backlog_of(store_url: str, txns: list[str], *, test: bool = False) -> None:
    """Events stored while Pingtree was away: the drain starts the moment a relay does (posting
    hundreds through a loaded machine would be slower than the engine, leaving no backlog).
    ``test``: stored as test traffic (a staging origin's, server/staging.py)."""
    store = open_store(store_url)
    for t in txns:
        payload = {"event_id": "form_submitted", "transaction_id": t}
        store.add(
            Record(
                id=uuid.uuid4().hex,
                cid="cmp_test",
                event_id="form_submitted",
                transaction_id=t,
                payload=mark(payload) if test else payload,
                received_at=time.time(),
                dedupe_key=f"cmp_test|{t}|form_submitted",
            ),
            owner=None,
            lease=30,
        )
    store.close()


def new_txns(n: int, tag: str) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"txn_{tag}_{run}_{i}" for i in range(n)]


def store_of(relay: Relay) -> Store:
    return open_store(load_config(relay.config_path).relay.store)


def all_settled(store: Store, expected: int) -> bool:
    counts = store.stats().counts
    return counts["pending"] == 0 and counts["delivered"] >= expected


def deliver_pids(relay: Relay) -> set[int]:
    """The pids of the relay's ``pingtree-relay deliver`` processes (children of the serve master)."""
    assert relay.proc is not None
    children = Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split()
    found = set()
    for pid in children:
        try:
            if b"deliver" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):  # the subcommand
                found.add(int(pid))
        except FileNotFoundError:
            continue
    return found


def threads_of(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (Linux: /proc/PID/task)."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def assert_each_counted_once(upstream: Upstream, store: Store, txns: list[str]) -> None:
    """Nothing lost (every event delivered, counted by the upstream) and nothing doubled: the upstream
    counted each event once, and only a record with an unknown earlier outcome was sent twice."""
    stats = upstream.stats()
    counted = stats["counted"]
    assert all(counted.get(t) == 1 for t in txns), {t: counted.get(t) for t in txns if counted.get(t) != 1}
    records = {r.transaction_id: r for r in store.find(limit=len(txns) + 10)}
    assert set(records) == set(txns)
    assert {r.state for r in records.values()} == {"delivered"}
    resent = [t for t in txns if stats["by_txn"][t] > 1 and not records[t].uncertain]
    assert not resent, f"sent twice without a lost attempt: {resent[:5]}"


# --- the cap ---------------------------------------------------------------------------------------


def test_in_flight_never_exceeds_max_in_flight(
    relays: RelayFactory, upstream: Upstream, store_url: str
) -> None:
    # 2 workers x 4 inline + the engine's share = 60 in flight at most, engine and inline together;
    # the engine's share is split between the three delivery processes (17 each).
    upstream.delay(1000)
    txns = new_txns(300, "cap")
    backlog_of(store_url, txns)
    relay = relays(workers=2, delivery_processes=3, max_in_flight=60, inline_timeout=5.0, upstream_timeout=8)
    wait_for(lambda: len(deliver_pids(relay)) == 3, timeout=15, message="three delivery processes")
    fresh = new_txns(40, "cap_fresh")
    assert set(post_all(relay, fresh)) <= {200, 202}  # inline attempts, where not skipped, share the cap
    store = store_of(relay)
    wait_for(lambda: all_settled(store, 340), timeout=120, message="all 340 delivered")
    peak = upstream.stats()["peak"]
    assert peak <= 60, f"{peak} requests in flight with max_in_flight = 60"
    # Honest only if the cap was reached: 300 events held 1 s each would otherwise all be in flight.
    assert peak >= 45, f"peak in flight {peak}: the cap was never approached"
    assert_each_counted_once(upstream, store, txns + fresh)
    store.close()


# --- batches ---------------------------------------------------------------------------------------


def test_outcomes_are_settled_in_batches(store_url: str, upstream: Upstream) -> None:
    """The engine in this process (real store, real upstream): count the store's write transactions
    (SQLite commits) or script calls (Redis) for 300 deliveries: claims and settles, batched."""
    upstream.delay(300)
    store = open_store(store_url)
    records = [
        Record(
            id=uuid.uuid4().hex,
            cid="cmp_test",
            event_id="form_submitted",
            transaction_id=t,
            payload={"event_id": "form_submitted", "transaction_id": t},
            received_at=time.time(),
            dedupe_key=f"cmp_test|{t}|form_submitted",
        )
        for t in new_txns(300, "batch")
    ]
    for record in records:
        store.add(record, owner=None, lease=30)
    engine = Dispatcher(store, forwarder_factory=lambda n: AsyncForwarder(upstream.url, max_connections=n))
    with count_store_writes(store) as writes:
        engine.start(300)
        try:
            wait_for(lambda: store.stats().counts["delivered"] == 300, timeout=60, message="300 delivered")
        finally:
            engine.stop()
        used = writes()
    assert upstream.stats()["requests"] == 300
    # One per event would be 300 settles + claims; batched, a few dozen at most (idle polls included).
    assert used <= 60, f"{used} store writes for 300 deliveries"
    store.close()


class UnencodableAnswerStore:
    """A store that cannot take one event's answer as it is (as sqlite3 and redis-py cannot take a
    lone surrogate): ``finish_many`` raises for any batch holding that outcome with its answer."""

    def __init__(self, store: Store, poisoned: str) -> None:
        self.store, self.poisoned = store, poisoned
        self.failed_batches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def finish_many(self, outcomes: Any) -> list[bool]:
        if any(o.record_id == self.poisoned and o.answer is not None for o in outcomes):
            self.failed_batches += 1
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return self.store.finish_many(outcomes)


def test_an_outcome_the_store_cannot_take_does_not_hold_up_its_batch(tmp_path: Path) -> None:
    """One unstorable outcome used to fail its whole batch for good: no outcome of it (or after it)
    was stored, and every event was sent again at each lease's end. Now the batch is settled one by
    one, and the bad one is stored without its answer."""
    store = open_store(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    txns = new_txns(20, "poison")
    backlog_of(f"sqlite:///{tmp_path / 'outbox.sqlite3'}", txns)
    poisoned = next(r.id for r in store.find(limit=50) if r.transaction_id == txns[7])
    sends: list[str] = []

    def pingtree(request: httpx.Request) -> httpx.Response:
        sends.append(json.loads(request.content)["transaction_id"])
        return httpx.Response(200, json={"status": 200, "message": "Event triggered successfully"})

    wrapped = UnencodableAnswerStore(store, poisoned)
    engine = Dispatcher(
        wrapped,  # type: ignore[arg-type]
        forwarder_factory=lambda n: AsyncForwarder(
            "http://pingtree.test", max_connections=n, transport=httpx.MockTransport(pingtree)
        ),
        lease=3,
        upstream_timeout=2,
    )
    engine.start(50)
    try:
        wait_for(lambda: store.stats().counts.get("delivered") == 20, timeout=30, message="all 20 settled")
    finally:
        engine.stop()
    assert sorted(sends) == sorted(txns)  # each sent once: no lease ran out unsettled
    bad = store.get(poisoned)
    assert bad is not None and bad.state == "delivered" and bad.last_answer is None
    assert bad.last_error is not None and bad.last_error.startswith("unstorable answer")
    assert wrapped.failed_batches >= 2  # its batch, then itself alone
    store.close()


class UpkeepCountingStore:
    """A real store whose ``maintain`` calls are counted, with the thread each ran on."""

    def __init__(self, store: Store) -> None:
        self.store, self.threads = store, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def maintain(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.store.maintain()


def test_the_engine_runs_the_stores_upkeep_on_a_store_thread_until_it_stops(tmp_path: Path) -> None:
    # The WAL checkpoints left the accept path for Store.maintain: if the engine stopped calling it,
    # nothing but SQLite's far-off safety net would checkpoint.
    store = UpkeepCountingStore(open_store(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    engine = Dispatcher(
        store,  # type: ignore[arg-type]
        forwarder_factory=lambda n: AsyncForwarder("http://127.0.0.1:9", max_connections=n),
    )
    engine.start(10)
    try:
        wait_for(lambda: len(store.threads) >= 3, timeout=10, message="three upkeep calls")
    finally:
        engine.stop()
    assert not engine.running()  # its run() awaits the upkeep's task: none is left calling
    assert all(name.startswith("pt-store") for name in store.threads), store.threads
    store.close()


# --- shutdown --------------------------------------------------------------------------------------


def test_sigterm_with_hundreds_in_flight_finishes_or_hands_back_every_lease(
    relays: RelayFactory, upstream: Upstream, store_url: str
) -> None:
    upstream.delay(2000)
    txns = new_txns(400, "term")
    backlog_of(store_url, txns)
    relay = relays(workers=2, max_in_flight=250, inline_concurrency=0, upstream_timeout=5, lease_seconds=60)
    wait_for(lambda: upstream.stats()["in_flight"] >= 150, timeout=30, message="hundreds in flight")
    assert relay.stop(timeout=40) == 0
    store = store_of(relay)
    records = store.find(limit=500)
    assert len(records) == 400
    assert all(r.lease_owner is None for r in records), "a lease outlived the shutdown"
    requests = upstream.stats()["by_txn"]
    for r in records:  # sent: its answer was awaited and stored; not sent: given back, unattempted
        if r.state == "delivered":
            assert requests.get(r.transaction_id) == 1 and r.attempts == 1
        else:
            assert (r.state, r.attempts, requests.get(r.transaction_id)) == ("pending", 0, None), r
    assert sum(r.state == "delivered" for r in records) >= 150
    upstream.delay(0)
    relay.start()  # a lease left behind would hold its event for 60 s: the drain below would time out
    wait_for(lambda: all_settled(store, 400), timeout=40, message="the rest delivered after the restart")
    assert upstream.stats()["by_txn"] == {t: 1 for t in txns}
    store.close()


# --- fork ------------------------------------------------------------------------------------------

# A process whose running engine has one of its threads (argv[1]: the loop's, or a store thread)
# inside a step holding a lock when the process forks. Exit status 0: the child could take the lock.
FORK_DURING_A_STEP = r"""
import os, sys, tempfile, threading, time
from server.forwarder import AsyncForwarder
from server.outbox import open_store
from server.outbox.dispatcher import Dispatcher

where = sys.argv[1]
lock, inside = threading.Lock(), threading.Event()

def step():  # what a step of the engine's may do: note an answer, write a file, count a metric
    with lock:
        inside.set()
        time.sleep(0.3)

class Store:
    def __init__(self, store):
        self.store = store
    def __getattr__(self, name):
        return getattr(self.store, name)
    def claim(self, *args, **kwargs):
        if where == "store":
            step()
        return self.store.claim(*args, **kwargs)
    def backlog(self, *args, **kwargs):
        if where == "store":
            step()
        return self.store.backlog(*args, **kwargs)

store = Store(open_store(f"sqlite:///{tempfile.mkdtemp()}/outbox.db"))
engine = Dispatcher(store, forwarder_factory=lambda n: AsyncForwarder("http://127.0.0.1:9", max_connections=n))
engine.start(4)
deadline = time.monotonic() + 10
while engine._loop is None and time.monotonic() < deadline:
    time.sleep(0.01)
if where == "loop":
    engine._loop.call_soon_threadsafe(step)
assert inside.wait(10), "no step began"
pid = os.fork()  # the step has the lock now, for 0.3 s
if pid == 0:
    os._exit(0 if lock.acquire(timeout=3) else 3)
_, status = os.waitpid(pid, 0)
os._exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("thread", ["loop", "store"])
def test_a_fork_waits_for_the_engines_threads_to_finish_their_step(thread: str) -> None:
    """A lock an engine thread holds at the fork stays held in the child for good (exit status 3
    here, without :class:`server.outbox.dispatcher.ForkPark`): the fork waits until the step ends."""
    done = subprocess.run(
        [sys.executable, "-c", FORK_DURING_A_STEP, thread], cwd=REPO, timeout=60, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]


APP_BUILT_BEFORE_THE_FORK = """
import sys
from server import create_app, wsgi
from server.config import load_config

from server.listening import bind_listener, bound_port, write_port_file

app = create_app(load_config(sys.argv[1]))  # the engine starts here, in the master, before any fork
listener = bind_listener("127.0.0.1", 0)
write_port_file(sys.argv[2], bound_port(listener))
wsgi.run(lambda: app, listener=listener, workers=2, preload_app=True)
"""


def test_an_engine_started_before_gunicorns_fork_delivers_in_the_workers(
    tmp_path: Path, upstream: Upstream, pages_port: int, store_url: str
) -> None:
    upstream.delay(1500)
    # A small cap per engine: the master's engine (still running: it was started there) cannot take
    # everything, so the workers' engines must show up among the lease owners.
    cfg = write_relay_config(
        tmp_path / "fork.toml",
        upstream=upstream.url,
        store=store_url,
        campaigns=campaigns_toml(pages_port),
        inline_concurrency=0,
        max_in_flight=10,
        rate_limits={"per_ip": "", "per_campaign": ""},
    )
    txns = new_txns(600, "fork")
    backlog_of(store_url, txns)  # 90 s of work for the master's engine alone: the workers' must join
    server = Server(
        [sys.executable, "-c", APP_BUILT_BEFORE_THE_FORK, str(cfg), "{port_file}"], tmp_path / "fork.log"
    )
    relay = Relay([], tmp_path / "fork.log")  # for its post(); the process is the one above
    store = open_store(store_url)
    try:
        server.start(timeout=30)
        relay.port, relay.proc = server.port, server.proc
        pid = server.proc.pid if server.proc else 0

        def workers() -> set[str]:
            return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())

        # While the upstream holds answers, the leases show who is delivering: owners carry their pid.
        wait_for(
            lambda: (
                {r.lease_owner.split(":")[1] for r in store.find(state="pending", limit=700) if r.lease_owner}
                & workers()
            ),
            timeout=60,
            message="a worker's engine leasing",
        )
        upstream.delay(0)
        assert (
            relay.post({"event_id": "form_submitted", "transaction_id": txns[0] + "_new"}).status_code == 202
        )
        wait_for(lambda: all_settled(store, 601), timeout=90, message="all delivered")
        assert upstream.stats()["counted"] == {t: 1 for t in [*txns, txns[0] + "_new"]}
    finally:
        server.kill()
        store.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# --- accepting while hundreds wait ------------------------------------------------------------------


def test_a_slow_upstream_with_hundreds_in_flight_does_not_stop_accepting(
    relays: RelayFactory, upstream: Upstream, store_url: str
) -> None:
    upstream.delay(15000)  # longer than everything below takes, even on a loaded machine
    backlog = new_txns(500, "slow")
    backlog_of(store_url, backlog)
    relay = relays(workers=2, max_in_flight=300, upstream_timeout=20, lease_seconds=40)
    wait_for(lambda: upstream.stats()["in_flight"] >= 250, timeout=30, message="hundreds in flight")
    fresh = new_txns(60, "fresh")
    answers = post_all(relay, fresh, threads=8)
    assert answers == [202] * 60, answers  # answered, from the store, while Pingtree holds 250+
    assert upstream.stats()["in_flight"] >= 250, "the upstream let go before the test was done"
    store = store_of(relay)
    upstream.delay(0)
    wait_for(lambda: all_settled(store, 560), timeout=120, message="everything delivered")
    assert_each_counted_once(upstream, store, backlog + fresh)
    store.close()


@pytest.mark.parametrize("flag", [None, "idle", 0, 3])
def test_the_delivery_processes_run_below_the_workers_cpu_priority(
    relay_factory: Callable[..., Relay], flag: int | str | None
) -> None:
    # An accept burst that takes every core goes to the workers first (bench: accept with a slow
    # upstream); the delivery processes catch up after it. serve's --delivery-nice: "idle" (Linux's
    # SCHED_IDLE) by default, or a niceness to add.
    relay = relay_factory(delivery_processes=2, delivery_nice=flag)
    wait_for(lambda: len(deliver_pids(relay)) == 2, timeout=30, message="two delivery processes")
    assert relay.proc is not None
    workers = set(relay.worker_pids()) - deliver_pids(relay)
    assert len(workers) == 2, workers
    own = os.getpriority(os.PRIO_PROCESS, relay.proc.pid)
    wanted = cli.DELIVERY_NICE if flag is None else flag
    expected = (os.SCHED_IDLE, own) if wanted == "idle" else (os.SCHED_OTHER, own + int(wanted))

    def priorities(pids: Iterable[int]) -> set[tuple[int, int]]:
        # Every thread of each (Linux: a policy and a niceness per thread).
        return {
            (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
            for pid in pids
            for tid in threads_of(pid)
        }

    wait_for(
        lambda: priorities(deliver_pids(relay)) == {expected},
        timeout=30,
        message=f"delivery processes at {expected}",
    )
    assert priorities(workers) == {(os.SCHED_OTHER, own)}
    said = "idle (SCHED_IDLE)" if wanted == "idle" else f"niceness {own + int(wanted)}"
    wait_for(  # each one's first line says what it got
        lambda: relay.log_path.read_text().count(f"CPU priority {said}") == 2,
        timeout=30,
        message=f"two lines saying CPU priority {said}",
    )


def test_where_the_idle_class_is_refused_delivery_takes_the_least_niceness() -> None:
    # In a child: a niceness cannot be given back.
    code = (
        "import os\n"
        "from server import cli\n"
        "def refuse(*args):\n"
        "    raise PermissionError('not here')\n"
        "os.sched_setscheduler = refuse\n"
        "before = os.getpriority(os.PRIO_PROCESS, 0)\n"
        "said = cli.lower_priority('idle')\n"
        "print(os.sched_getscheduler(0) == os.SCHED_OTHER, os.getpriority(os.PRIO_PROCESS, 0) - before)\n"
        "print(said)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before = os.getpriority(os.PRIO_PROCESS, 0)
    lowered, said = out.splitlines()
    assert lowered.split() == ["True", str(min(19, 19 - before))]  # a niceness stops at 19
    assert said == f"niceness {min(19, before + 19)} (SCHED_IDLE refused: not here)"  # the operator is told


def test_a_bad_delivery_nice_is_refused_naming_what_it_takes(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("20", "-1", "lazy"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "--config", "x.toml", "--delivery-nice", bad])
        assert "expected 0 to 19 or idle" in capsys.readouterr().err


# --- kill -9 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["deliver", "relay"])
def test_kill_9_during_a_drain_loses_and_doubles_nothing(
    relays: RelayFactory, upstream: Upstream, store_url: str, victim: str
) -> None:
    upstream.delay(3000)
    txns = new_txns(500, f"kill_{victim}")
    backlog_of(store_url, txns)
    relay = relays(
        workers=2,
        delivery_processes=2,
        max_in_flight=300,
        inline_concurrency=0,
        upstream_timeout=4,
        lease_seconds=5,
    )
    # Over 150 (one delivery process's share of the 300): both have requests in flight, so the one
    # killed below surely had some.
    wait_for(lambda: upstream.stats()["in_flight"] >= 250, timeout=30, message="hundreds in flight")
    if victim == "deliver":
        before = deliver_pids(relay)
        assert len(before) == 2, before
        pid = min(before)
        os.kill(pid, signal.SIGKILL)  # serve's master starts another; the leases expire, then go again
        wait_for(
            lambda: len(now := deliver_pids(relay)) == 2 and pid not in now,
            timeout=15,
            message="the killed delivery process was replaced",
        )
    else:
        relay.kill()  # the whole process group: master, workers, delivery process
        relay.start()
    store = store_of(relay)
    upstream.delay(0)
    wait_for(lambda: all_settled(store, 500), timeout=120, message="all 500 delivered after the kill")
    assert_each_counted_once(upstream, store, txns)
    assert any(r.uncertain for r in store.find(limit=600)), "nothing was in flight at the kill"
    store.close()


def test_a_requeued_dead_letter_gets_a_new_max_age_window(tmp_path: Path) -> None:
    # An operator requeues what died in a long outage; its first retryable failure since must
    # not kill it again at once because it was received more than max_age_hours ago.
    store = open_store(f"sqlite:///{tmp_path / 'o.sqlite3'}")
    engine = Dispatcher(
        store,
        forwarder_factory=lambda n: AsyncForwarder("http://127.0.0.1:9", max_connections=n),
        max_age=3600.0,
    )
    old = time.time() - 5 * 3600
    record = Record(
        id="cmp_test:old",
        cid="cmp_test",
        event_id="quote_viewed",
        transaction_id="t",
        payload={},
        received_at=old,
    )
    failed = Attempt(503, None, uncertain=True)
    assert engine.outcome(record, failed, owner="w")[0].state == "dead"  # never requeued: given up
    record.requeued_at = time.time() - 60
    decision, outcome = engine.outcome(record, failed, owner="w")
    assert decision.state == "retry" and outcome.state == "pending"
    record.requeued_at = time.time() - 2 * 3600  # its new window has passed too
    assert engine.outcome(record, failed, owner="w")[0].state == "dead"
    store.close()


class _AnswerNoRuleReads(dict):  # type: ignore[type-arg]
    """An answer whose reading fails: stands for any answer classify() was not written for."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no rule for this answer")


def test_an_answer_that_cannot_be_read_does_not_hold_up_its_batch(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'o.sqlite3'}")
    engine = Dispatcher(
        store, forwarder_factory=lambda n: AsyncForwarder("http://127.0.0.1:9", max_connections=n)
    )
    records = []
    for t in ("t-good", "t-odd"):
        record = Record(
            id=f"cmp_test:{t}",
            cid="cmp_test",
            event_id="quote_viewed",
            transaction_id=t,
            payload={},
            received_at=time.time(),
        )
        stored, _ = store.add(record, owner=engine.owner, lease=30)
        records.append(stored)
    good, odd = records
    engine._settle_batch([(good, Attempt(200, {"status": 200})), (odd, Attempt(200, _AnswerNoRuleReads()))])
    assert store.get(good.id).state == "delivered"  # type: ignore[union-attr]
    settled = store.get(odd.id)
    assert settled is not None and settled.state == "pending" and settled.lease_owner is None
    assert settled.uncertain and settled.last_error.startswith("unread answer: RuntimeError")  # type: ignore[union-attr]
    store.close()
