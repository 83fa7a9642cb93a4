"""Group commit for the requests of one turn of the worker's event loop.

Under load the worker runs requests on its loop's thread, one after another (server/worker.py), so
the SQLite store's group commit across threads (server/outbox/sqlite.py) never saw two events at
once: every accepted event was a transaction of its own. A transaction costs more than its rows:
the WAL frames of the table's page and of each index's page, the file locks, and the page cache
that another process's commit makes stale. Measured under ``serve`` with the upstream down, a
commit of 16 events at a time took the workers' CPU per event from 508-536 us to 396-412 us
(docs/benchmarks.md).

So each request on the loop runs in a greenlet (a coroutine for synchronous code: Flask's contexts
live in contextvars, which each greenlet has its own of). A store write calls
:func:`wait_for_commit` with its commit function: the request is suspended and the loop goes on with
the other requests it read. Two loop turns later, each commit function waited for runs once, writing
every event queued meanwhile in one transaction, and each suspended request resumes where it
stopped, its write committed (or failed, which is then its own answer, as before). No answer is
written before its event is durable.

Why two turns and not the next one: the requests read in the next turn (from the clients answered
in the turn before) then join the commit too. Committing at the next turn, each worker's clients
split into two groups that took turns, each committing without the other: 8-10 events a commit
with 16 connections a worker, against 16 (measured). A request waits for at most the requests read
in its turn and the next; on an idle box a write costs two near-empty loop turns (tens of
microseconds).

Anywhere else (a request thread, the delivery engine, a command, a test) :func:`wait_for_commit`
returns False at once and the caller commits by itself.

The greenlets are kept (:class:`_Runner`): one that has run its request waits for the next. A new
greenlet per request cost about 10 us: Python 3.11 gives each greenlet its own stack of frames,
mapped at its first call and unmapped when it ends (strace under load: an ``mmap`` and a
``munmap`` per request; docs/benchmarks.md).

:class:`CommitQueue` is the stores' side: a process's writes of one kind queued, and committed in
batches, by the loop at its turn or by whichever thread commits first. The SQLite store commits a
batch as one transaction; the Redis store sends it as one pipeline (one round trip).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from greenlet import getcurrent, greenlet

log = logging.getLogger("pingtree_relay.group_commit")

_hub: greenlet | None = None  # the loop thread's own greenlet, which runs the loop
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: int | None = None
_commits: dict[Callable[[], None], None] = {}  # commit functions waited for this turn, in order
_waiting: list[_Runner] = []  # requests suspended until they have run
IDLE_RUNNERS = 64  # greenlets kept for the next requests: more than a worker's requests of two turns
_idle: list[_Runner] = []  # of the loop's thread (a greenlet runs on the thread that made it)


class _Runner(greenlet):
    """A greenlet of the loop's thread that runs requests, one after another (:func:`run`)."""

    back_to: greenlet  # who waits for the request to return or to wait: set by run(), wait_for_commit()

    def run(self, job: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
        try:
            while True:
                function, args = job
                function(*args)
                if len(_idle) >= IDLE_RUNNERS:
                    return
                _idle.append(self)
                job = self.back_to.switch()  # until run() hands this one the next request
        finally:  # it ends (enough are kept, or an error): back to the caller, the error with it
            self.parent = self.back_to


def serve(loop: asyncio.AbstractEventLoop) -> None:
    """Let requests of ``loop``, which runs on the calling thread, wait for a group commit."""
    global _hub, _loop, _loop_thread
    _hub, _loop, _loop_thread = getcurrent(), loop, threading.get_ident()
    _commits.clear()
    _waiting.clear()
    _idle.clear()


def run(function: Callable[..., Any], *args: Any) -> None:
    """Call ``function(*args)`` (one request) in a greenlet; back once it has returned or is waiting
    for a commit, in which case it is finished after the commit, by the loop."""
    if _hub is None or threading.get_ident() != _loop_thread:
        greenlet(function).switch(*args)  # no loop served here: nothing to wait for, nothing kept
        return
    runner = _idle.pop() if _idle else _Runner(parent=_hub)
    runner.back_to = getcurrent()
    runner.gr_context = contextvars.Context()  # each request starts empty, as in a greenlet of its own
    runner.switch((function, args))


def wait_for_commit(commit: Callable[[], None]) -> bool:
    """From a request run by :func:`run`: return True once ``commit`` has run, two loop turns from
    the first request that waited this time, for every request that waited meanwhile. Anywhere
    else, False at once: the caller commits by itself."""
    current = getcurrent()
    if not isinstance(current, _Runner) or threading.get_ident() != _loop_thread:
        return False
    if not _waiting:  # the first this turn: commit two turns from now (module docstring)
        assert _loop is not None
        _loop.call_soon(_loop.call_soon, _commit_and_resume)
    _commits[commit] = None
    _waiting.append(current)
    # Back to run()'s caller; resumed by the loop (_commit_and_resume), to which it returns then.
    back, current.back_to = current.back_to, _hub
    back.switch()
    return True


def _commit_and_resume() -> None:
    commits, waiting = list(_commits), list(_waiting)
    _commits.clear()
    _waiting.clear()
    for commit in commits:
        try:
            commit()
        except Exception:  # the batch's writes were given this error as their answer
            log.exception("group commit failed")
    for request in waiting:
        try:
            request.switch()
        except Exception:  # a request answers its own errors; this is a bug's last resort
            log.exception("request failed after its group commit")


@dataclass
class Write:
    """One write in a :class:`CommitQueue`: what to write; then its result or error (set by the
    batch's commit), and ``done`` (set by the queue once the batch is over)."""

    value: Any
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class CommitQueue:
    """A process's writes of one kind, committed in batches.

    ``commit_batch(writes)`` commits a batch and sets each write's ``result`` (never None) or
    ``error`` (one write failing must not fail the others). :meth:`write` returns a write's result once it is
    committed: on the worker's loop, at the turn's group commit (:func:`wait_for_commit`); on a
    thread, by whichever thread commits first every write queued meanwhile. ``lock`` is held
    around taking a batch and committing it: a thread that finds its write taken by another's batch
    waits there until that batch is committed, and the thread that gets the lock takes every write
    queued while it waited. A store may hold it for its other writes too (SQLite's write lock)."""

    def __init__(self, commit_batch: Callable[[list[Write]], None]) -> None:
        self._commit_batch = commit_batch
        self._forked()
        _queues.add(self)

    def _forked(self) -> None:
        """A fresh queue and locks (at start, and in a forked child: another thread of the parent
        may have held a lock at the fork, and the parent's writes are the parent's to commit)."""
        self._queued: list[Write] = []
        self._queue_lock = threading.Lock()
        self.lock = threading.Lock()

    def __len__(self) -> int:
        """How many writes wait for a commit."""
        return len(self._queued)

    def write(self, value: Any) -> Any:
        write = Write(value)
        with self._queue_lock:
            self._queued.append(write)
        wait_for_commit(self.commit)
        if not write.done:
            self.commit()
        if not write.done:  # commit() returns after any batch in progress: a bug if ever seen
            raise RuntimeError("group commit: write left uncommitted")
        if write.error is not None:
            raise write.error
        return write.result

    def commit(self) -> None:
        """Commit every write queued so far (none: nothing to do)."""
        with self.lock:
            with self._queue_lock:
                batch, self._queued = self._queued, []
            if not batch:
                return
            failure: BaseException | None = None
            try:
                self._commit_batch(batch)
            except BaseException as exc:
                failure = exc
                raise
            finally:  # never leave a caller whose write was taken without an answer
                for write in batch:
                    if write.result is None and write.error is None:
                        write.error = failure or RuntimeError("group commit: write left without an answer")
                    write.done = True


_queues: weakref.WeakSet[CommitQueue] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for queue in list(_queues):
        queue._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
