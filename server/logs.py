"""Request ids and structured logs: one JSON line per event decision.

Every request gets an id (a sane incoming ``X-Request-Id`` is kept, so a proxy's id follows the
request through; anything else is replaced) and answers with it in ``X-Request-Id``. The observer
bus (:mod:`server.observe`) tells us each decision (accepted, rejected, filtered, delivery); each
becomes one line on stderr, e.g.::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "info", "message": "accepted", "event": "accepted", "request_id": "...",
     "cid": "cmp_1", "event_id": "sale", "outcome": "delivered", "status": 200, "client": "203.0.113.0/24"}

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

    def __init__(self, records: queue.SimpleQueue[_Queued]) -> None:
        super().__init__(name="decision-log", daemon=True)
        self.records = records
        self.formatter = JsonFormatter()

    def run(self) -> None:
        while True:
            batch = [self.records.get()]
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
        """Write what is queued, then end (at exit)."""
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


def log_decision(kind: str, fields: dict[str, Any]) -> None:
    """Observer: one line per decision; the bus swallows anything this raises."""
    if kind not in _DECISIONS:
        return
    line: dict[str, Any] = {"event": kind}
    rid = request_id()
    if rid is not None:  # a background delivery has none: its line is followed by event_uuid
        line["request_id"] = rid
    line.update({key: fields[key] for key in _FIELDS if fields.get(key) is not None})
    if has_request_context():
        line["client"] = mask_ip(current_request().remote_addr)
    level = logging.WARNING if kind == "rejected" or fields.get("state") == "dead" else logging.INFO
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
    relay.observers.add(log_decision)
    if relay.config.relay.access_log:
        app.before_request(_start_clock)
        app.after_request(_access_line)
