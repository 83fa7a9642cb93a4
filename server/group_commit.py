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
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent, greenlet

log = logging.getLogger("pingtree_relay.group_commit")

_hub: greenlet | None = None  # the loop thread's own greenlet, which runs the loop
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: int | None = None
_commits: dict[Callable[[], None], None] = {}  # commit functions waited for this turn, in order
_waiting: list[greenlet] = []  # requests suspended until they have run


def serve(loop: asyncio.AbstractEventLoop) -> None:
    """Let requests of ``loop``, which runs on the calling thread, wait for a group commit."""
    global _hub, _loop, _loop_thread
    _hub, _loop, _loop_thread = getcurrent(), loop, threading.get_ident()
    _commits.clear()
    _waiting.clear()


def run(function: Callable[..., Any], *args: Any) -> None:
    """Call ``function(*args)`` (one request) in a greenlet of its own; back once it has returned
    or is waiting for a commit, in which case it is finished after the commit, by the loop."""
    greenlet(function).switch(*args)


def wait_for_commit(commit: Callable[[], None]) -> bool:
    """From a request run by :func:`run`: return True once ``commit`` has run, two loop turns from
    the first request that waited this time, for every request that waited meanwhile. Anywhere
    else, False at once: the caller commits by itself."""
    current = getcurrent()
    if _hub is None or current is _hub or threading.get_ident() != _loop_thread:
        return False
    if not _waiting:  # the first this turn: commit two turns from now (module docstring)
        assert _loop is not None
        _loop.call_soon(_loop.call_soon, _commit_and_resume)
    _commits[commit] = None
    _waiting.append(current)
    _hub.switch()
    return True


def _commit_and_resume() -> None:
    commits, waiting = list(_commits), list(_waiting)
    _commits.clear()
    _waiting.clear()
    for commit in commits:
        try:
            commit()
        except Exception:  # its callers find their writes not done, and commit them themselves
            log.exception("group commit failed")
    for request in waiting:
        try:
            request.switch()
        except Exception:  # a request answers its own errors; this is a bug's last resort
            log.exception("request failed after its group commit")
