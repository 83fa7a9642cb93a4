"""Request ids and structured logs: one JSON line per event decision.

Every request gets an id (a sane incoming ``X-Request-Id`` is kept, so a proxy's id follows the
request through; anything else is replaced) and answers with it in ``X-Request-Id``. The observer
bus (:mod:`server.observe`) tells us each decision (accepted, rejected, filtered, delivery); each
becomes one line on stderr, e.g.::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "info", "message": "accepted", "event": "accepted", "request_id": "...",
     "cid": "cmp_1", "event_id": "sale", "outcome": "delivered", "status": 200, "client": "203.0.113.0/24"}

Each process writes at most ``relay.decision_log_limit`` lines of each level a second and counts
the rest in one ``lines_left_out`` line (:class:`_LineBudget`): a sample of every second, not a
flood that journald would cut for us, warnings and all.

What is never logged: bodies (payloads carry personal data), user agents, and full IP addresses
(only the /24 of an IPv4 address or the /48 of an IPv6 one: enough to spot a noisy network, not
enough to identify a visitor). Background deliveries run outside any request: their lines carry
``event_uuid`` (also on the ``accepted`` line) instead of a request id.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, has_request_context, request

from .contexts import current_request
from .headers import request_header
from .jsonlog import JsonFormatter, mask_ip
from .relay import relay_of
from .request_state import request_state

DECISION_LOGGER = "pingtree_relay.decisions"
# Loggers are one object per name for the process's life: looked up once, not per line
# (getLogger takes logging's module lock).
_DECISION_LOG = logging.getLogger(DECISION_LOGGER)
# Letters, digits and a few separators, bounded: the id is echoed in a header and written to logs,
# so a hostile client must not be able to inject newlines, JSON or kilobytes through it.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{8,128}$")
_DECISIONS = ("accepted", "rejected", "filtered", "delivery")
# Only these observer fields reach a log line: anything else an emitter adds later stays out until
# someone decides it is safe to log.
_FIELDS = (
    "cid",
    "event_id",
    "outcome",
    "state",
    "reason",
    "status",
    "http_status",
    "event_uuid",
    "latency_ms",
    "attempts",
    "inline",
    "test",
)


def request_id() -> str | None:
    """This request's id, or None outside a request."""
    return request_state().request_id if has_request_context() else None


def decision_logger() -> logging.Logger:
    """The JSON decision logger, with exactly one stderr writer per process however many apps it builds.

    Request threads only put records on a queue; one listener thread per process formats them and
    writes stderr. A plain StreamHandler holds its lock through the write, and with a line per event
    the request and delivery threads queued on that lock (16 % of a worker's samples under load).
    """
    global _listener
    logger = _DECISION_LOG
    if _listener is not None and _listener[0] == os.getpid():
        return logger  # first: setLevel() below empties every logger's level cache, on each call
    with _listener_lock:
        if _listener is not None and _listener[0] == os.getpid():
            return logger
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not twice through a root handler someone else configured
        for old in [h for h in logger.handlers if getattr(h, "_pingtree_json", False)]:
            logger.removeHandler(old)  # a handler inherited through fork feeds a listener that did not
        records: queue.SimpleQueue[_Queued] = queue.SimpleQueue()
        listener = _LineWriter(records)
        listener.start()
        atexit.register(listener.stop)  # flushes what is queued before the process exits
        handler = _QueueHandler(records)
        handler._pingtree_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        _listener = (os.getpid(), listener, records)
    return logger


def _write_decision(level: int, message: str, fields: dict[str, Any]) -> None:
    """A decision line straight onto the writer's queue, as a tuple: one or two per event, so
    neither through ``Logger.log`` (which looks up its caller's frame and takes the handler's lock
    for each) nor as a ``LogRecord`` (a dozen attributes nobody reads: 15 % of the accept path's
    logging cost in process)."""
    listener = _listener
    if listener is None or listener[0] != os.getpid():  # this process's first line: start its writer
        decision_logger()
        listener = _listener
    if listener is not None and _DECISION_LOG.isEnabledFor(level):  # always, once it has started
        listener[2].put((time.time(), level, message, fields))


# What the writer's queue holds: a decision (created, level, message, fields), or a LogRecord that
# reached the decision logger the ordinary way (its _QueueHandler), or None to stop.
_Queued = tuple[float, int, str, dict[str, Any]] | logging.LogRecord | None


class _StderrWrites:
    """Whether the writer is in a write to stderr, so that a fork waits for it to end.

    CPython does not re-make an io buffer's lock in a forked child: a child forked while another
    thread of its parent was inside ``sys.stderr.write`` inherits stderr's buffer locked by a thread
    it does not have, and its first write to stderr (a log line, its own writer's) hangs for good.
    Under load the parent's writer thread is writing much of the time, so an app built before
    gunicorn forks (``preload_app``; an embedder's delivery engine logging in the master) could hand
    that to a worker. The writer holds :attr:`lock` through each write; a fork takes it first (at
    most ``FORK_WAIT_SECONDS``: a stderr nobody reads must not stop forks for good), and the child
    gets a lock of its own.
    """

    FORK_WAIT_SECONDS = 2.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._held_for_fork = False
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork_in_parent,
            after_in_child=self._after_fork_in_child,
        )

    def _before_fork(self) -> None:
        self._held_for_fork = self.lock.acquire(timeout=self.FORK_WAIT_SECONDS)

    def _after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self.lock.release()

    def _after_fork_in_child(self) -> None:
        self.lock, self._held_for_fork = threading.Lock(), False


_STDERR_WRITES = _StderrWrites()


class _LineWriter(threading.Thread):
    """The decision lines' writer thread: takes what is queued, formats it and writes it to
    whatever ``sys.stderr`` is then (the thread outlives whoever swaps stderr: a test's capture, a
    daemon's redirect), in batches: one ``write`` for every line queued meanwhile, and a pause of
    ``PAUSE_SECONDS`` after each batch, so that a busy worker's lines cost it one wake-up of this
    thread per batch, not one per line (each wake-up takes the GIL from the request in progress).

    The lines are those :class:`server.jsonlog.JsonFormatter` makes, in the order they were queued."""

    PAUSE_SECONDS = 0.01
    IDLE_SECONDS = 1.0  # with nothing queued this long, the line budget's summary is written (if any)

    def __init__(self, records: queue.SimpleQueue[_Queued]) -> None:
        super().__init__(name="decision-log", daemon=True)
        self.records = records
        self.formatter = JsonFormatter()

    def run(self) -> None:
        while True:
            try:
                batch = [self.records.get(timeout=self.IDLE_SECONDS)]
            except queue.Empty:  # quiet: say what the line budget left out before the quiet began
                summary = _budget.flush()
                if summary is None:
                    continue
                batch = [_left_out_line(summary)]
            while True:
                try:
                    batch.append(self.records.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            lines = [self._format(item) for item in batch if item is not None]
            if lines:
                with _STDERR_WRITES.lock:  # not torn by a fork (_StderrWrites)
                    try:
                        sys.stderr.write("\n".join(lines) + "\n")
                        sys.stderr.flush()
                    except Exception:  # a closed or broken stderr must not end the writer
                        pass
            if stop:
                return
            time.sleep(self.PAUSE_SECONDS)

    def _format(self, item: tuple[float, int, str, dict[str, Any]] | logging.LogRecord) -> str:
        if isinstance(item, logging.LogRecord):
            return self.formatter.format(item)
        created, level, message, fields = item
        return self.formatter.format_line(created, level, message, fields)

    def stop(self) -> None:
        """Write what is queued (and what the line budget left out), then end (at exit)."""
        summary = _budget.flush(final=True)
        if summary is not None:
            self.records.put(_left_out_line(summary))
        self.records.put(None)
        self.join(timeout=5)


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands the record over as it is: the listener's JsonFormatter needs ``record.fields``, and the
    stock ``prepare`` would format the message in the request thread, the work this moves away."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:  # a traceback object must not outlive its thread's frames
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


# (pid, the writer thread, its queue) of this process.
_listener: tuple[int, _LineWriter, queue.SimpleQueue[_Queued]] | None = None
_listener_lock = threading.Lock()


class _LineBudget:
    """At most ``limit`` decision lines of each level (info, warning) a second in this process
    (``relay.decision_log_limit``; 0: no limit). What is over it is counted by kind, and said in
    one ``lines_left_out`` line: at the first decision of a later second, or by the writer when
    none comes. A warning (a refusal, a dead letter) never waits behind a flood of info lines.

    Why: at the volumes the relay is built for (1,000 events/s) a line per decision is two lines
    per event, about 660 KB/s of text. journald keeps 10,000 lines per 30 s of a service by default
    (scaled up with free disk) and drops the rest, warnings included, and the writing costs a
    worker about 7 % of its CPU per event in process (callgrind). The metrics and the dashboard
    count every event; the log keeps a sample of each second, every kind of decision in it, and the count.
    (An A/B under ``serve``, wrk at 32 connections: 7-15 % less CPU per accepted event.)"""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.clock = time.monotonic  # tests give it their own
        self._forked()

    def _forked(self) -> None:
        """Nothing counted yet (at start, and in a forked child: the parent's counts are its own)."""
        self._lock = threading.Lock()
        self._second = -1
        self._since = self.clock()
        self._used: dict[int, int] = {}  # lines written this second, by level
        self._left_out: dict[str, int] = {}

    def allow(self, level: int, kind: str) -> bool:
        """Whether this decision gets its line (else it is counted)."""
        if not self.limit:
            return True
        summary = None
        with self._lock:
            now = self.clock()
            if int(now) != self._second:
                summary = self._take_summary(now)
                self._second = int(now)
                self._used.clear()
            used = self._used.get(level, 0)
            allowed = used < self.limit
            if allowed:
                self._used[level] = used + 1
            else:
                if not self._left_out:  # the first left out since the last summary
                    self._since = now
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
        if summary is not None:
            _write_decision(logging.INFO, LEFT_OUT, summary)
        return allowed

    def flush(self, *, final: bool = False) -> dict[str, Any] | None:
        """The summary of what was left out before the current second (``final``: up to now), if
        anything was: the writer's, when no decision has come for a while, and at exit."""
        with self._lock:
            now = self.clock()
            if int(now) == self._second and not final:
                return None
            return self._take_summary(now)

    def _take_summary(self, now: float) -> dict[str, Any] | None:
        left_out, self._left_out = self._left_out, {}
        if not left_out:
            return None
        return {
            "event": "lines_left_out",
            "left_out": left_out,
            "limit": self.limit,
            "seconds": round(now - self._since, 3),  # from the first of them to now
        }


LEFT_OUT = "decision lines left out"  # the message of a _LineBudget summary


def _left_out_line(summary: dict[str, Any]) -> tuple[float, int, str, dict[str, Any]]:
    """A summary as the writer's queue holds a decision (what :func:`_write_decision` queues)."""
    return (time.time(), logging.INFO, LEFT_OUT, summary)


# This process's budget: one per process, like the writer (the last app built sets its limit).
_budget = _LineBudget()
os.register_at_fork(after_in_child=_budget._forked)


def log_decision(kind: str, fields: dict[str, Any]) -> None:
    """Observer: one line per decision, within this process's :class:`_LineBudget`; the bus
    swallows anything this raises."""
    if kind not in _DECISIONS:
        return
    level = logging.WARNING if kind == "rejected" or fields.get("state") == "dead" else logging.INFO
    if not _budget.allow(level, kind):
        return
    line: dict[str, Any] = {"event": kind}
    rid = request_id()
    if rid is not None:  # a background delivery has none: its line is followed by event_uuid
        line["request_id"] = rid
    line.update({key: fields[key] for key in _FIELDS if fields.get(key) is not None})
    if has_request_context():
        line["client"] = mask_ip(current_request().remote_addr)
    _write_decision(level, kind, line)


def _assign_request_id() -> None:
    incoming = request_header("X-Request-Id") or ""
    request_state().request_id = incoming if _SANE_REQUEST_ID.match(incoming) else _new_request_id()


_ids: tuple[int, str, Iterator[int]] = (0, "", iter(()))
_ids_lock = threading.Lock()


def _new_request_id() -> str:
    """A random per-process prefix and a counter: unique across workers and machines, and cheaper
    than a uuid4 (an ``os.urandom`` call) on every request."""
    global _ids
    pid, prefix, counter = _ids
    if pid != os.getpid():  # first call in this (forked) process
        with _ids_lock:  # one prefix per process, even when its first requests come at once
            if _ids[0] != os.getpid():
                _ids = (os.getpid(), os.urandom(12).hex(), itertools.count(1))
            pid, prefix, counter = _ids
    return f"{prefix}{next(counter):08x}"


def _echo_request_id(response: Response) -> Response:
    state = request_state()
    if state.request_id is None:  # an earlier before_request hook answered before ours ran
        _assign_request_id()
    response.headers["X-Request-Id"] = state.request_id or ""
    return response


def _start_clock() -> None:
    request_state().started = time.perf_counter()


def _access_line(response: Response) -> Response:
    """``relay.access_log``: one JSON line per request, in the decision lines' form (masked client,
    request id; the path without its query string, which may carry a visitor's attribution)."""
    started = request_state().started
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": request_state().request_id,
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "bytes": response.calculate_content_length(),
        "duration_ms": round((time.perf_counter() - started) * 1000, 2) if started is not None else None,
        "client": mask_ip(request.remote_addr),
    }
    _write_decision(logging.INFO, f"{request.method} {request.path} {response.status_code}", fields)
    return response


def init_app(app: Flask) -> None:
    """Request ids on every request, JSON decision lines from the observer bus, the access log if asked."""
    app.before_request(_assign_request_id)
    app.after_request(_echo_request_id)
    decision_logger()
    relay = relay_of(app)
    _budget.limit = relay.config.relay.decision_log_limit
    relay.observers.add(log_decision)
    if relay.config.relay.access_log:
        app.before_request(_start_clock)
        app.after_request(_access_line)
