"""The delivery engine: one asyncio event loop keeps up to ``max_in_flight`` requests to Pingtree in flight.

Why an event loop: an in-flight request costs a pending coroutine here, not a blocked thread, so
hundreds can wait on a slow Pingtree at once (throughput = in-flight / latency: 400 in flight at
300 ms is 1,300 events/s) for a few kilobytes each. The store is blocking (sqlite3, redis-py), so
claims and settles run on store threads beside the loop, in batches (and a third runs the store's
upkeep, :meth:`server.outbox.Store.maintain`, every ``MAINTAIN_SECONDS``):

- **claim**: lease up to ``CLAIM_BATCH`` due records in one store call whenever that much room
  is free under the cap (never one record per freed slot: a store transaction per event);
- **send**: one coroutine per record (:class:`server.forwarder.AsyncForwarder`);
- **settle**: outcomes queue up while the previous batch is being written and go to the store in
  one ``finish_many`` (one SQLite transaction / one Redis script call), so the batch grows with the
  load by itself and costs no added wait when idle.

One engine per box: ``pingtree-relay serve`` runs it in its own ``pingtree-relay deliver`` process
beside the gunicorn workers (:meth:`run`); ``create_app(start_delivery=True)`` runs it in a thread
of the current process (:meth:`start`), held still while the process forks (:class:`ForkPark`) and
restarted in the child. Shutdown stops claiming, lets sends in flight finish (each attempt ends by
``upstream_timeout``), settles every outcome, and gives back the leases of records never sent.

The inline attempt of the accept path settles through :meth:`settle`: the same classification,
the same ``finish_many``, the same observer event.

**Pingtree unreachable** (:class:`Reachability`): after ``UNREACHABLE_AFTER`` connection failures
in a row with no answer between them, the engine stops claiming batches and sends one due event
every ``PROBE_SECONDS`` until one gets through, then resumes at full speed. Sending every due event
into a refused port only burnt the CPU that accepting needs (measured: the delivery processes used
0.8 of a core while the upstream was down, docs/benchmarks.md); the events wait in the store, due,
and the probe's success releases them at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..forwarder import AsyncSender, Attempt, Decision, classify
from ..staging import is_test
from . import Outcome, Record, State, Store

log = logging.getLogger("pingtree_relay.delivery")

Observer = Callable[[Record, Attempt, Decision, bool], None]  # record, attempt, decision, inline
ForwarderFactory = Callable[[int], AsyncSender]  # max connections -> a forwarder, built in the loop

CLAIM_BATCH = 200  # records per claim: a claim is one store transaction however many it takes
SETTLE_BATCH = 500  # outcomes per finish_many (Redis runs a script that long without other clients)
# Answers arriving within this window are settled in one write: on a quiet box the settler is fast
# enough to write nearly every answer alone (157 SQLite commits for 300 deliveries), and each commit
# takes the write lock from the accept path. 20 ms more before an outcome is stored costs nothing
# (leases last 30 s); a kill -9 in the window resends those events, marked uncertain.
SETTLE_GATHER_SECONDS = 0.02
IDLE_POLL_SECONDS = 0.05  # how soon an event stored by another process is claimed when idle
STORE_RETRY_SECONDS = 0.5  # a failed claim or settle is tried again after this
UNREACHABLE_AFTER = 10  # connection failures in a row that make Pingtree unreachable (module docstring)
PROBE_SECONDS = 1.0  # while it is: one event sent this often, to find out when it is back
# What a store raises for a value it cannot take, not for being down: settled apart (_settle_batch).
_UNSTORABLE = (UnicodeError, TypeError, ValueError)
MAINTAIN_SECONDS = 0.1  # how often the engine runs the store's upkeep (Store.maintain: checkpoints)
STORE_THREADS = 3  # the engine's threads for blocking store calls: claims, settles, upkeep
_STORE_THREADS = "pt-store"  # their names' prefix


class Reachability:
    """Whether the engine's own attempts reach Pingtree: :meth:`saw` each attempt; ``down`` after
    ``UNREACHABLE_AFTER`` unreachable attempts in a row, up again at the first that is not."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.failures = 0  # unreachable attempts in a row
        self.down_since: float | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def saw(self, attempt: Attempt) -> str | None:
        """Count ``attempt``; ``"down"`` or ``"up"`` when that changes the state, else None."""
        if not attempt.unreachable:
            self.failures = 0
            if self.down_since is None:
                return None
            log.warning(
                "Pingtree reachable again after %.1f s: delivering at full speed",
                self.clock() - self.down_since,
            )
            self.down_since = None
            return "up"
        self.failures += 1
        if self.down_since is not None or self.failures < UNREACHABLE_AFTER:
            return None
        self.down_since = self.clock()
        log.error(
            "Pingtree unreachable (%d connection failures in a row, last: %s): one event every %.0f s "
            "until it answers; the others wait in the store",
            self.failures,
            attempt.error,
            PROBE_SECONDS,
        )
        return "down"


class ForkPark:
    """Holds the engine's threads still, between two steps, while their process forks.

    A fork copies every lock as it is, and a child has only the thread that forked: a lock another
    thread held at that moment stays held in the child for good. The engine's threads take many
    (the store's, the metrics values', the upstream state file's, each time an answer is noted),
    so a child forked mid-step would hang at its first use of that lock; :meth:`Dispatcher.start`
    runs the engine in the child again, and that engine would then deliver nothing (gunicorn with
    ``preload_app``: the app and its engine are built in the master, before the fork).

    Before the fork, :meth:`hold` asks the loop thread and each store thread to wait on an event at
    the end of what it is doing, and waits until all have (at most ``WAIT_SECONDS``: a step that
    does not end must not stop the fork for good); :meth:`release` (in the parent after the fork)
    sets them going again. A held thread holds no lock. The parent loses those milliseconds; the
    child starts from locks nobody holds.
    """

    WAIT_SECONDS = 2.0
    HOLD_CAP_SECONDS = 30.0  # a held thread goes on by itself past this, whatever happened to the fork

    def __init__(self) -> None:
        self._resume: threading.Event | None = None

    def hold(
        self, loop: asyncio.AbstractEventLoop | None, executor: ThreadPoolExecutor | None, threads: int
    ) -> bool:
        """Hold ``loop``'s thread and the ``threads`` threads of ``executor``; True once all wait."""
        resume, held = threading.Event(), threading.Semaphore(0)
        self._resume = resume

        def wait() -> None:
            held.release()
            resume.wait(self.HOLD_CAP_SECONDS)

        expected = 0
        if executor is not None:
            for _ in range(threads):  # each waits in a thread of its own: the pool has no more
                try:
                    executor.submit(wait)
                except RuntimeError:  # shut down meanwhile
                    break
                expected += 1
        if loop is not None:
            try:
                loop.call_soon_threadsafe(wait)
                expected += 1
            except RuntimeError:  # the loop closed meanwhile
                pass
        deadline = time.monotonic() + self.WAIT_SECONDS
        for _ in range(expected):
            if not held.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
        return True

    def release(self) -> None:
        resume, self._resume = self._resume, None
        if resume is not None:
            resume.set()


class Dispatcher:
    """Delivers the outbox. ``max_in_flight`` is given to :meth:`start` or :meth:`run`."""

    def __init__(
        self,
        store: Store,
        *,
        forwarder_factory: ForwarderFactory,
        upstream_timeout: float = 10.0,
        lease: float = 30.0,
        max_age: float = 72 * 3600.0,
        retry_base: float = 1.0,
        retry_cap: float = 300.0,
        observer: Observer | None = None,
    ) -> None:
        self.store = store
        self.forwarder_factory = forwarder_factory
        self.upstream_timeout = upstream_timeout
        self.lease = lease
        self.max_age = max_age
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.observer = observer
        self.max_in_flight = 1
        self.in_flight = 0
        self.peak_in_flight = 0
        self.forwarder: AsyncSender | None = None  # the running engine's (its .last feeds /readyz)
        self.reachability = Reachability()
        self._owner_pid = -1
        self._owner = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_pid = -1
        self._executor: ThreadPoolExecutor | None = None
        self._stop_requested = False
        self._restart_after_fork = False
        self._lock = threading.Lock()
        self._fork_park = ForkPark()
        me = weakref.ref(self)  # the hooks must not keep a dropped engine alive

        def park() -> None:
            engine = me()
            if engine is not None:
                engine._park_for_fork()

        def unpark() -> None:
            engine = me()
            if engine is not None:
                engine._fork_park.release()

        def forget_in_child() -> None:
            engine = me()
            if engine is not None:
                engine._forget_parent_engine()

        os.register_at_fork(before=park, after_in_parent=unpark, after_in_child=forget_in_child)

    @property
    def owner(self) -> str:
        """This process's lease owner id (a fork gets its own: leases never cross processes)."""
        if self._owner_pid != os.getpid():
            self._owner_pid = os.getpid()
            self._owner = f"{os.uname().nodename}:{self._owner_pid}:{uuid.uuid4().hex[:8]}"
        return self._owner

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, max_in_flight: int) -> None:
        """Run the engine in a daemon thread of this process (idempotent). After a fork, the child
        starts its own on the first call: the parent's thread does not exist there."""
        with self._lock:
            if self._thread is not None and self._thread_pid == os.getpid() and self._thread.is_alive():
                return
            self._stop_requested = False
            self._thread_pid = os.getpid()
            self._thread = threading.Thread(
                target=self.run, args=(max_in_flight,), name="pt-delivery", daemon=True
            )
            self._thread.start()
            self._restart_after_fork = True

    def running(self) -> bool:
        return self._thread is not None and self._thread_pid == os.getpid() and self._thread.is_alive()

    def run(self, max_in_flight: int, *, handle_signals: bool = False) -> None:
        """Deliver until :meth:`stop` (or SIGTERM/SIGINT with ``handle_signals``), then shut down cleanly."""
        self.max_in_flight = max(1, max_in_flight)
        asyncio.run(self._main(handle_signals))

    def wake(self) -> None:
        """Claim now rather than at the next poll (an event was just stored in this process)."""
        loop, wake = self._loop, getattr(self, "_wake", None)
        if loop is not None and wake is not None and not wake.is_set() and self._thread_pid == os.getpid():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def request_stop(self) -> None:
        """Ask the engine to shut down (from any thread); :meth:`run` returns when it is done."""
        self._stop_requested = True
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._request_stop)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, finish sends in flight, settle them, give back the rest; wait for all that."""
        self._restart_after_fork = False
        if self._thread_pid == os.getpid():
            self.request_stop()
        thread = self._thread
        if (
            thread is not None
            and self._thread_pid == os.getpid()
            and thread is not threading.current_thread()
        ):
            thread.join(self.upstream_timeout + 10.0 if timeout is None else timeout)

    def _request_stop(self) -> None:
        self._stop_requested = True
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()
            self._wake.set()
            self._room.set()
            self._reachable.set()

    def _park_for_fork(self) -> None:
        # Only a running engine of this process, and never from its own threads (they would wait
        # for themselves): a fork from there holds nothing still, as before.
        me = threading.current_thread()
        if not self.running() or me is self._thread or me.name.startswith(_STORE_THREADS):
            return
        self._fork_park.hold(self._loop, self._executor, STORE_THREADS)

    def _forget_parent_engine(self) -> None:
        # In a forked child: the parent's loop thread is not here, and its lock may have been held.
        self._lock = threading.Lock()
        self._fork_park = ForkPark()  # the parent's held threads are not here: nothing to release
        self._loop = self._executor = None
        self._thread = None
        self._thread_pid = -1
        if getattr(self, "_restart_after_fork", False):
            # gunicorn with preload_app: the app (and this engine) was built before the fork.
            self.start(self.max_in_flight)

    # --- the engine -------------------------------------------------------------------------------

    async def _main(self, handle_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._stopping, self._wake, self._room = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._settle_ready = asyncio.Event()
        self._reachable = asyncio.Event()  # set when Pingtree answers again: ends a probe's pause
        self._to_settle: list[tuple[Record, Attempt]] = []
        self._unsent: dict[str, Record] = {}  # claimed, send not started: given back at shutdown
        self._sends: set[asyncio.Task[None]] = set()
        self._closing = False
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._request_stop)
        self._loop = loop
        if self._stop_requested:
            self._stopping.set()
        # One claims while one settles, and one runs the upkeep.
        executor = self._executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix=_STORE_THREADS)
        forwarder = self.forwarder = self.forwarder_factory(self.max_in_flight)
        settler = asyncio.create_task(self._settler(executor))
        maintainer = asyncio.create_task(self._maintainer(executor))
        try:
            await self._claimer(executor, forwarder)
            if self._sends:  # shutdown: let what is in flight finish; requests end by upstream_timeout
                _, late = await asyncio.wait(set(self._sends), timeout=self.upstream_timeout + 2.0)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        finally:
            self._closing = True
            self._settle_ready.set()
            self._stopping.set()  # the maintainer's cue (a claimer that failed for good did not set it)
            await settler
            await maintainer
            if self._unsent:
                try:
                    await self._store_call(executor, self.store.release, list(self._unsent), self.owner)
                except Exception:  # their leases expire instead; never sent, so the next claim sends them
                    log.exception("could not give back %d leases", len(self._unsent))
            await forwarder.aclose()
            executor.shutdown(wait=True)
            self._loop = self._executor = None

    async def _claimer(self, executor: ThreadPoolExecutor, forwarder: AsyncSender) -> None:
        # Claim in batches: wait until a batch worth of room is free, unless nothing is in flight.
        min_claim = max(1, min(CLAIM_BATCH, self.max_in_flight // 8))
        failures, idle = 0, False
        while not self._stopping.is_set():
            probing = self.reachability.down  # one event at a time, each PROBE_SECONDS apart
            free = (1 if probing else self.max_in_flight) - self.in_flight
            if free <= 0 or (free < min_claim and self.in_flight and not probing):
                self._room.clear()
                await self._room.wait()
                continue
            want = min(free, CLAIM_BATCH)
            try:
                if idle and not await self._store_call(executor, self.store.backlog, 1):
                    # Idle: look (a read) before claiming (a write): an empty claim would take
                    # SQLite's write lock from the accept path 20 times a second for nothing.
                    await self._pause(IDLE_POLL_SECONDS)
                    continue
                records = await self._store_call(executor, self.store.claim, self.owner, want, self.lease)
            except Exception as exc:  # the store may be briefly unreachable (Redis restart): keep going
                # One traceback per outage, then one line per retry: an outage must not flood the log.
                failures += 1
                log.error(
                    "claim failed (%d in a row): %s: %s",
                    failures,
                    type(exc).__name__,
                    exc,
                    exc_info=failures == 1,
                )
                await self._pause(STORE_RETRY_SECONDS)
                continue
            failures = 0
            for record in records:
                self._launch(record, forwarder)
            if self._stopping.is_set():
                break
            idle = len(records) < want
            if probing:
                await self._wait_for(self._reachable, PROBE_SECONDS)
            elif idle:
                await self._pause(IDLE_POLL_SECONDS)

    def _launch(self, record: Record, forwarder: AsyncSender) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._unsent[record.id] = record
        task = asyncio.create_task(self._send(record, forwarder))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, record: Record, forwarder: AsyncSender) -> None:
        self._unsent.pop(record.id, None)
        try:
            attempt = await forwarder.send(record.cid, record.payload)
        except asyncio.CancelledError:
            # Shut down mid-request: it may have reached Pingtree. Settled as an uncertain retry.
            attempt = Attempt(None, error="interrupted by shutdown", uncertain=True)
        except Exception as exc:  # a bug, not the network: keep the event, retry it later
            log.exception("delivery of %s failed", record.id)
            attempt = Attempt(None, error=f"internal: {type(exc).__name__}", uncertain=True)
        finally:
            self.in_flight -= 1
            self._room.set()
        # Only Pingtree's own answers say whether Pingtree is reachable: a test event goes to the
        # staging upstream (server/staging.py), which may be down while Pingtree is not.
        if not is_test(record.payload) and self.reachability.saw(attempt) == "up":
            self._reachable.set()
        self._to_settle.append((record, attempt))
        self._settle_ready.set()

    async def _settler(self, executor: ThreadPoolExecutor) -> None:
        # While one batch is written, the next accumulates: batches grow with the load by themselves.
        give_up_at: float | None = None
        while True:
            if not self._to_settle:
                if self._closing:
                    return
                self._settle_ready.clear()
                await self._settle_ready.wait()
                continue
            if not self._closing and len(self._to_settle) < SETTLE_BATCH:
                await asyncio.sleep(SETTLE_GATHER_SECONDS)
            batch, self._to_settle = self._to_settle[:SETTLE_BATCH], self._to_settle[SETTLE_BATCH:]
            try:
                await self._store_call(executor, self._settle_batch, batch)
            except Exception:
                log.exception("settling %d outcomes failed; retrying", len(batch))
                if self._closing:
                    give_up_at = give_up_at or time.monotonic() + self.lease
                    if time.monotonic() > give_up_at:
                        # Their leases expire and the records are sent again, marked uncertain.
                        log.error(
                            "gave up settling %d outcomes at shutdown", len(batch) + len(self._to_settle)
                        )
                        return
                self._to_settle[:0] = batch
                await asyncio.sleep(STORE_RETRY_SECONDS)

    async def _maintainer(self, executor: ThreadPoolExecutor) -> None:
        # The store's upkeep, off the accept path and on a thread of its own (a checkpoint may take
        # milliseconds, and claims and settles go on meanwhile), until the engine stops.
        while not self._stopping.is_set():
            try:
                await self._store_call(executor, self.store.maintain)
            except Exception:
                log.exception("store upkeep failed; trying again in %s s", MAINTAIN_SECONDS)
            await self._until(self._stopping, MAINTAIN_SECONDS)

    async def _store_call(self, executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _pause(self, seconds: float) -> None:
        await self._wait_for(self._wake, seconds)

    @staticmethod
    async def _wait_for(event: asyncio.Event, seconds: float) -> None:
        """``seconds``, or less if ``event`` is set meanwhile (it is cleared first)."""
        event.clear()
        await Dispatcher._until(event, seconds)

    @staticmethod
    async def _until(event: asyncio.Event, seconds: float) -> None:
        """``seconds``, or less if ``event`` is (or gets) set."""
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            pass

    # --- outcomes (shared with the inline attempt) ------------------------------------------------

    def outcome(self, record: Record, attempt: Attempt, *, owner: str) -> tuple[Decision, Outcome]:
        """What ``attempt`` means for ``record`` (pure apart from the clock): forwarder.classify, and
        a retry that would pass ``max_age`` becomes dead."""
        decision = classify(
            attempt,
            attempts=record.attempts,
            was_uncertain=record.uncertain,
            base=self.retry_base,
            cap=self.retry_cap,
        )
        now = time.time()
        since = max(record.received_at, record.requeued_at or 0.0)  # a requeue starts a new window
        if decision.state == "retry" and now - since + decision.delay > self.max_age:
            decision = Decision("dead", reason=f"gave up after {record.attempts} attempts: {decision.reason}")
        state: State = (
            "dead"
            if decision.state == "dead"
            else "delivered"
            if decision.state == "delivered"
            else "pending"
        )
        return decision, Outcome(
            record.id,
            owner,
            state,
            now + decision.delay,
            attempt.status,
            attempt.answer,
            decision.reason or attempt.error,
            attempt.uncertain,
            attempt.latency_ms,
            attempts=record.attempts,  # this lease's, not a later one's (Outcome.attempts)
        )

    def settle(self, record: Record, attempt: Attempt, *, owner: str) -> Decision:
        """Store one inline attempt's outcome, the way the engine stores its batches."""
        decision, outcome = self.outcome(record, attempt, owner=owner)
        [stored] = self.store.finish_many([outcome])
        self._report(record, attempt, decision, outcome, stored, inline=True)
        return decision

    def _settle_batch(self, batch: list[tuple[Record, Attempt]]) -> None:
        decided = [(record, attempt, *self._outcome_or_retry(record, attempt)) for record, attempt in batch]
        try:
            flags = self.store.finish_many([outcome for _, _, _, outcome in decided])
        except _UNSTORABLE:
            # One outcome the store cannot take (a value it cannot encode) must not keep the whole
            # batch, and every batch after it, from being stored: each alone, then that one plainer.
            flags = [self._finish_alone(outcome) for _, _, _, outcome in decided]
        for (record, attempt, decision, outcome), stored in zip(decided, flags, strict=True):
            self._report(record, attempt, decision, outcome, stored, inline=False)

    def _outcome_or_retry(self, record: Record, attempt: Attempt) -> tuple[Decision, Outcome]:
        """:meth:`outcome`, or, should reading the answer fail (a bug, an answer no rule foresaw),
        a retry marked uncertain: one such answer must not keep its whole batch, and every batch
        queued behind it, from being stored (their leases would expire and all be sent again)."""
        try:
            return self.outcome(record, attempt, owner=self.owner)
        except Exception as exc:  # noqa: BLE001 - any failure here is settled, never raised
            log.exception("could not decide what the answer for %s means; retrying it", record.id)
            unread = dataclasses.replace(
                attempt, status=None, answer=None, uncertain=True, error=f"unread answer: {ascii(exc)[:200]}"
            )
            return self.outcome(record, unread, owner=self.owner)

    def _finish_alone(self, outcome: Outcome) -> bool:
        try:
            return self.store.finish_many([outcome])[0]
        except _UNSTORABLE as exc:
            log.error(
                "outcome of %s could not be stored as it was (%s); stored without the answer",
                outcome.record_id,
                exc,
            )
            plain = dataclasses.replace(
                outcome, answer=None, error=f"unstorable answer: {ascii(outcome.error)[:200]}"
            )
            return self.store.finish_many([plain])[0]

    def _report(
        self,
        record: Record,
        attempt: Attempt,
        decision: Decision,
        outcome: Outcome,
        stored: bool,
        *,
        inline: bool,
    ) -> None:
        if not stored:
            log.warning("lease on %s was lost before its outcome was stored", record.id)
        record.state = outcome.state
        record.last_status, record.last_answer = attempt.status, attempt.answer
        if self.observer is not None:
            self.observer(record, attempt, decision, inline)
