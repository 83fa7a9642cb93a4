"""Background delivery: claim due events, send them upstream, record each outcome.

One dispatcher per process, started lazily after the fork (a thread started before gunicorn forks
would not exist in the workers). A claimer thread leases batches from the store and hands them to a
small pool of sender threads; ``submit`` never blocks the accept path. On shutdown it stops
claiming, lets in-flight sends finish, and gives unsent leases back so another process takes them
at once instead of after the lease expires.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..forwarder import Attempt, Decision, Forwarder, classify
from . import Record, Store

log = logging.getLogger("pingtree_relay.delivery")

Observer = Callable[[Record, Attempt, Decision], None]


class Dispatcher:
    """Delivers the outbox. ``deliver`` is shared with the relay's inline attempt."""

    def __init__(
        self,
        store: Store,
        forwarder: Forwarder,
        *,
        concurrency: int = 16,
        lease: float = 30.0,
        max_age: float = 72 * 3600.0,
        retry_base: float = 1.0,
        retry_cap: float = 300.0,
        poll_interval: float = 0.5,
        observer: Observer | None = None,
    ) -> None:
        self.store = store
        self.forwarder = forwarder
        self.concurrency = concurrency
        self.lease = lease
        self.max_age = max_age
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.poll_interval = poll_interval
        self.observer = observer
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._held: set[str] = set()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart after a fork) the claimer thread. Cheap to call on every request."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self.owner = f"{os.uname().nodename}:{self._pid}:{uuid.uuid4().hex[:8]}"
            self._stopping.clear()
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="pt-deliver")
            self._thread = threading.Thread(target=self._run, name="pt-claimer", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, finish in-flight sends (up to ``timeout``), give back what was not sent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            leftovers = list(self._held)
        if leftovers:
            self.store.release(leftovers, self.owner)

    # --- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                claimed = self._claim_batch()
            except Exception:  # the store may be briefly unreachable (Redis restart): keep going
                log.exception("claim failed")
                claimed = 0
            if not claimed:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    def _claim_batch(self) -> int:
        free = 0
        while free < self.concurrency and self._slots.acquire(blocking=False):
            free += 1
        if not free:
            self._wake.wait(0.05)  # all senders busy; they wake us when one frees
            self._wake.clear()
            return 1
        try:
            records = self.store.claim(self.owner, free, self.lease)
        except BaseException:
            # Give the slots back, or one failed claim (a Redis restart) would stall delivery for good.
            for _ in range(free):
                self._slots.release()
            raise
        for _ in range(free - len(records)):
            self._slots.release()
        assert self._pool is not None
        with self._lock:  # held before any submit: whatever is not sent, stop() gives back
            self._held.update(record.id for record in records)
        for record in records:
            if not self._stopping.is_set():
                try:
                    self._pool.submit(self._send, record)
                    continue
                except RuntimeError:
                    # The interpreter is exiting: concurrent.futures' own exit hook shut the pool down
                    # before our atexit hook (Relay.close) ran. Stop claiming; stop() releases the rest.
                    self._stopping.set()
            self._slots.release()
        return len(records)

    def _send(self, record: Record) -> None:
        try:
            self.deliver(record, owner=self.owner)
        except Exception:
            log.exception("delivery of %s failed", record.id)
        finally:
            with self._lock:
                self._held.discard(record.id)
            self._slots.release()
            self._wake.set()

    # --- one attempt --------------------------------------------------------------------------

    def deliver(self, record: Record, *, owner: str, timeout: float | None = None) -> tuple[Attempt, Decision]:
        """Send ``record`` (already leased to ``owner``) once and store the outcome."""
        attempt = self.forwarder.send(record.cid, record.payload, timeout=timeout)
        return attempt, self.settle(record, attempt, owner=owner)

    def settle(self, record: Record, attempt: Attempt, *, owner: str) -> Decision:
        decision = classify(attempt, attempts=record.attempts, was_uncertain=record.uncertain,
                            base=self.retry_base, cap=self.retry_cap)
        now = time.time()
        if decision.state == "retry" and now - record.received_at + decision.delay > self.max_age:
            decision = Decision("dead", reason=f"gave up after {record.attempts} attempts: {decision.reason}")
        state = "pending" if decision.state == "retry" else decision.state
        stored = self.store.finish(
            record.id, owner, state=state, next_at=now + decision.delay,
            status=attempt.status, answer=attempt.answer,
            error=decision.reason or attempt.error, uncertain=attempt.uncertain, latency_ms=attempt.latency_ms,
        )
        if not stored:
            log.warning("lease on %s was lost before its outcome was stored", record.id)
        record.state = state
        record.last_status, record.last_answer = attempt.status, attempt.answer
        if self.observer is not None:
            self.observer(record, attempt, decision)
        return decision
