"""The gunicorn worker: one event loop per process parses HTTP; the app runs where it may.

Why not gthread: measured on this project's 2-core box at 1,000 requests/s, a bare Flask endpoint
cost 0.96-1.08 ms of CPU per request under gunicorn's gthread and 0.12 ms in process; almost all of
the difference was the server (a pure-Python HTTP parser, a thread hand-off and a poller
registration per request, keep-alive bookkeeping). Here one asyncio loop per worker reads every
connection, ``httptools`` (llhttp, C) parses, and an answer is written in one ``write``: the same
endpoint cost 0.38-0.40 ms (docs/benchmarks.md).

Where the app runs: on the loop's own thread, unless the request may wait on the network. The app
says which by ``app.extensions["wants_thread"](environ)``; the relay says yes only while it would
try the event inline upstream (an idle box and a free inline slot, so that a page gets its
``conversion_id``), and no under load, which is when the hand-off would cost. Such a request runs on
one of ``threads`` threads and the loop goes on. Two rules of the worker's own keep threads for
when they help: a request never queues for a thread (all taken: it runs on the loop), and a loop
that is behind (its rounds ``BEHIND_SECONDS`` late while it was busy: saturated) gives out none. An app without the
hint runs every request on a thread, as gthread did. Code on the loop's thread can ask
:func:`may_wait` and must not wait when it says no: the relay then answers 202 from the store
instead of an inline attempt. A request on the loop's thread runs in a greenlet of its own, so that
its store write can wait for the loop turn's group commit while the loop serves the other requests
(server/group_commit.py); it is answered when it has finished, as one on a thread is.

Slow clients ("slowloris"): a connection costs a socket and a buffer, never a thread. A request not
complete within ``read_timeout`` seconds of its first byte is answered 408 and closed; a connection
that sends nothing is closed after ``read_timeout`` (new) or ``keepalive`` seconds (after an
answer), without an answer, like nginx. A head larger than ``HEAD_LIMIT`` is refused (431). A body
larger than ``BODY_LIMIT`` (declared, or chunked as it arrives) is handed to the app as far as it
came (the app answers 413) and the connection closed. The nginx in docs/deployment.md does the
same job in front with ``client_header_timeout`` and ``client_body_timeout``.

Fair accept: gunicorn's workers share one listening socket, and whichever is awake first accepts.
A burst of new keep-alive connections (a load balancer's pool, nginx's ``keepalive``, a load
generator) can all land on one worker: measured at 300 ms upstream, one of four workers held 442 of
500 connections and two held none, so one process (one GIL, one core) did the whole box's work.
Each worker therefore publishes its open connections in a small table shared by every worker of
one master (:class:`ConnectionTable`, anonymous shared memory made before the fork), and stops
accepting while it holds more than the least-loaded live worker plus one. The least-loaded worker
always accepts, so a connection never waits for a worker to change its mind. Connections a worker
took before the others were up (the first worker to boot gets every early connection) are moved
the safe way: a worker holding more than twice the least-loaded worker's connections answers its
next request with ``Connection: close`` (RFC 9112 section 9.6), and the client's new connection goes
to a worker below it. Nothing is cut mid-request and no idle connection is closed under a client
that may be sending on it.

Shutdown: SIGTERM stops accepting, answers every request from then on with ``Connection: close``,
closes idle connections after ``IDLE_GRACE_SECONDS`` (a pooled connection a client reuses at once
is not closed under its request), lets requests in progress finish (up to gunicorn's
``graceful_timeout``, after which the master kills the worker) and then exits.
"""

from __future__ import annotations

import asyncio
import io
import mmap
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
from gunicorn.workers.base import Worker

from . import group_commit
from .heap import freeze_what_is_loaded

READ_TIMEOUT_SECONDS = 10.0
HEAD_LIMIT = 64 * 1024
BODY_LIMIT = 64 * 1024  # larger than any event body the relay accepts (relay.max_body_bytes)
# A loop this late for its rounds, having run Python for at least BEHIND_BUSY of the time since
# the previous ones, is saturated: a request on a thread would wait for the GIL behind the loop's,
# and an inline attempt there costs its page seconds, not 300 ms (measured at 1,000 events/s
# offered to 2 cores: p99 1.5 s). Late but not busy is the box's scheduler running something else
# (a test suite, a build): no reason to refuse threads. Idle, the rounds run within a ms or two.
BEHIND_SECONDS = 0.02
BEHIND_BUSY = 0.25
TICK_SECONDS = 0.1  # how often the loop does its rounds: heartbeat, deadlines, fair accept, shutdown
# Shutting down, a connection idle at the signal is kept this long: a client sending its next request
# on it meanwhile (a pooled keep-alive connection, reused at once) gets its answer with
# Connection: close, where closing the connection under it would race that request (a reset).
IDLE_GRACE_SECONDS = 0.3
# How often, at most, a busy loop looks for new connections between requests (LoopWorker.handle):
# often enough that a loop turn of hundreds of ms keeps accepting, rarely enough to cost nothing.
LOOK_SECONDS = 0.01


def _error_answer(status: int, reason: str, message: str) -> bytes:
    body = b'{"status":%d,"type":"error","message":"%s"}' % (status, message.encode())
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body)
    )


_TIMEOUT_ANSWER = _error_answer(408, "Request Timeout", "Request timeout")
_BAD_REQUEST_ANSWER = _error_answer(400, "Bad Request", "Malformed HTTP request")
_HEAD_TOO_LARGE_ANSWER = _error_answer(431, "Request Header Fields Too Large", "Request header too large")
_SERVER_ERROR_ANSWER = _error_answer(500, "Internal Server Error", "Internal server error")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = (204, 304)

# The environ key under which the worker hands an app the request body it has read whole (every
# request but one cut short at BODY_LIMIT): the same bytes as wsgi.input, which stays readable, so
# an app may take them without going through a stream (the relay's event view: server/api.py).
WHOLE_BODY = "pingtree_relay.whole_body"

_loop_threads: set[int] = set()


def may_wait() -> bool:
    """Whether the calling thread may wait on the network: not the event loop's own (module docstring)."""
    return threading.get_ident() not in _loop_threads


class ConnectionTable:
    """Open connections per worker, in memory that every worker forked from this process shares.

    A slot is ``(pid, accepting, connections, heartbeat)``; a worker writes only its own. A slot
    whose heartbeat is older than ``STALE_SECONDS`` (a worker that died without clearing it) or
    that is not accepting (a worker shutting down) does not count. Reads are not locked: a torn
    read can only make one accept decision slightly unfair, never lose a connection.
    """

    SLOTS = 64  # more than any box's workers (serve allows 2 to 8 by default)
    STALE_SECONDS = 5.0
    _SLOT = struct.Struct("=iiid")  # pid, accepting, connections, heartbeat (CLOCK_MONOTONIC)

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, self.SLOTS * self._SLOT.size)  # MAP_SHARED|MAP_ANONYMOUS

    def _read(self, slot: int) -> tuple[int, int, int, float]:
        return self._SLOT.unpack_from(self._memory, slot * self._SLOT.size)  # type: ignore[return-value]

    def claim(self, age: int, pid: int) -> int:
        """A slot for the worker ``pid`` (gunicorn's ``age`` numbers workers uniquely)."""
        now = time.monotonic()
        for step in range(self.SLOTS):
            slot = (age + step) % self.SLOTS
            owner, _, _, beat = self._read(slot)
            if owner in (0, pid) or now - beat > self.STALE_SECONDS:
                self.publish(slot, pid, accepting=False, connections=0)
                return slot
        return age % self.SLOTS  # every slot fresh: more than SLOTS workers; share one

    def publish(self, slot: int, pid: int, *, accepting: bool, connections: int) -> None:
        self._SLOT.pack_into(
            self._memory, slot * self._SLOT.size, pid, int(accepting), connections, time.monotonic()
        )

    def clear(self, slot: int) -> None:
        self._SLOT.pack_into(self._memory, slot * self._SLOT.size, 0, 0, 0, 0.0)

    def live(self) -> list[int]:
        """Connections held by each live worker that accepts (not one shutting down)."""
        now = time.monotonic()
        return [
            conns
            for pid, accepting, conns, beat in self._SLOT.iter_unpack(self._memory)
            if pid and accepting and now - beat <= self.STALE_SECONDS
        ]

    def least(self) -> int | None:
        """The fewest connections any live, accepting worker holds (None: no such worker)."""
        counts = self.live()
        return min(counts) if counts else None


# Made at import, in the master (gunicorn imports the worker class before it forks any worker),
# so that every worker, including those started later, inherits the same shared memory.
CONNECTIONS = ConnectionTable()
FAIR_SLACK = 1  # a worker accepts while it holds at most the least-loaded worker's count + this
ACCEPT_BURST = 16  # and takes up to this many more at once once it accepts (LoopWorker._accept)


SHED_MARGIN = 32  # connections a worker may hold above twice the least loaded's before it sheds


def over_share(mine: int, least: int | None) -> bool:
    """Whether a worker holding ``mine`` connections should hand one back (``Connection: close``).

    Much wider than the accept rule (more than twice the least-loaded worker's, plus 32): only a
    gross imbalance, such as every connection of a burst taken before the other workers were up,
    moves connections; the ordinary unevenness of a burst (counts published up to a loop turn
    late) is left for the accept rule to even out."""
    return least is not None and mine > 2 * least + SHED_MARGIN


# A header's name as sent -> its environ key ("" for a name that is dropped), as names are seen:
# decoding, upper-casing and prefixing each header of each request was a tenth of the server's CPU.
# Bounded, against a client sending random names (past the bound, names are worked out each time).
_ENVIRON_KEYS: dict[bytes, str] = {}
_ENVIRON_KEYS_MAX = 1024


def _environ_key(name: bytes) -> str:
    """``HTTP_USER_AGENT`` for ``User-Agent``, ``CONTENT_TYPE`` for ``Content-Type``; "" for a name
    with an underscore (X_Forwarded_For would pass for X-Forwarded-For; gunicorn drops them too)."""
    key = _ENVIRON_KEYS.get(name)
    if key is None:
        upper = name.decode("latin-1").upper()
        if "_" in upper:
            key = ""
        else:
            key = upper.replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
        if len(_ENVIRON_KEYS) < _ENVIRON_KEYS_MAX:
            _ENVIRON_KEYS[name] = key
    return key


class _Request:
    """One request as the parser gives it: head, then body pieces."""

    __slots__ = ("url", "headers", "body", "size", "oversize", "keep_alive", "method", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0  # head bytes, then body bytes
        self.oversize = False  # handed over before its body was all here: close after the answer
        self.keep_alive = True
        self.method = "GET"
        self.version = "1.1"


class _Stop(Exception):
    """Raised from a parser callback: parse no further on this connection. ``answer``, if any, is
    this worker's own answer to write after the requests parsed so far, before closing; ``invalid``
    what was wrong with the request, for the log."""

    def __init__(self, answer: bytes | None = None, invalid: str | None = None) -> None:
        self.answer, self.invalid = answer, invalid


class Connection(asyncio.Protocol):
    """One client connection: parse, hand each request to the worker in order, write its answers.

    Requests are answered in the order they came (HTTP/1.1 pipelining): while one is with the app,
    reading pauses and requests already parsed wait in ``_ready``. Once parsing stops (a malformed
    or oversized request, an upgrade), the requests parsed before it are answered, then the
    worker's own answer if it has one, and the connection is closed."""

    def __init__(self, worker: LoopWorker, server: tuple[str, str]) -> None:
        self.worker = worker
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, str] = ("", "")
        self.request: _Request | None = None  # being read
        self._ready: deque[_Request] = deque()
        self.busy = False  # a request is with the app
        self.closing = False
        self.stopped = False  # parse no more: answer what is ready, then ``_last_answer``, then close
        self._last_answer: bytes | None = None
        self._in_next = False
        self.opened_at = time.monotonic()
        self.deadline = self.opened_at + worker.read_timeout  # to get (the rest of) a request
        self.reading = False  # some bytes of a request came: 408 at the deadline, not a silent close

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = (str(peer[0]), str(peer[1]))
        self.worker.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.worker.closed(self)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.stopped:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            stop = exc.__context__
            if not isinstance(stop, _Stop):
                raise
            if stop.invalid is not None:
                self._invalid(stop.invalid)
            self._stop(stop.answer)
        except httptools.HttpParserUpgrade:  # "Upgrade: h2c" and the like: answered as HTTP/1.1
            self._stop(None)  # (RFC 9110 7.8), and nothing after it is read
        except httptools.HttpParserError as exc:
            self._invalid(str(exc))
            self._stop(_BAD_REQUEST_ANSWER)
        self._next()

    def _invalid(self, error: str) -> None:
        # gunicorn's own words for it, which operators may already grep for
        self.worker.log.warning("Invalid request from ip=%s: %s", self.peer[0], error)

    def _stop(self, answer: bytes | None) -> None:
        self.stopped, self._last_answer = True, answer
        if self.transport is not None:
            self.transport.pause_reading()

    # --- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = _Request()
        if not self.reading:
            self.reading = True
            self.deadline = time.monotonic() + self.worker.read_timeout

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        self.request.url += url  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        self.request.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None
        request.method = self.parser.get_method().decode("latin-1")
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        request.size = 0
        declared, expects = None, b""
        for name, value in request.headers:  # the first of each, in one pass
            lowered = name.lower()
            if lowered == b"content-length" and declared is None:
                declared = value
            elif lowered == b"expect" and not expects:
                expects = value
        if declared is not None and declared.strip().isdigit() and int(declared) > BODY_LIMIT:
            self._hand_over_early(request)  # the app refuses it from the header alone (413)
        if expects.strip().lower() == b"100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)  # the client waits for this before it sends the body

    def on_body(self, body: bytes) -> None:
        request = self.request
        assert request is not None
        request.body.append(body)
        request.size += len(body)
        if request.size > BODY_LIMIT:  # chunked, past the limit: the app sees that much and refuses
            self._hand_over_early(request)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        if request is not None:
            self._ready.append(request)
        self.reading = False

    def _grow(self, size: int) -> None:
        request = self.request
        assert request is not None
        request.size += size
        if request.size > HEAD_LIMIT:
            raise _Stop(_HEAD_TOO_LARGE_ANSWER, f"request head larger than {HEAD_LIMIT} bytes")

    def _hand_over_early(self, request: _Request) -> None:
        request.oversize, request.keep_alive = True, False
        self._ready.append(request)
        self.request, self.reading = None, False
        raise _Stop()

    # --- answering ----------------------------------------------------------------------------------

    def _next(self) -> None:
        """Hand the next parsed request to the worker, unless one is with the app already."""
        if self._in_next:
            return  # an answer given on the loop's thread, inside this loop: it goes on below
        self._in_next = True
        try:
            while self._ready and not self.busy and not self.closing:
                self.busy = True
                self.worker.handle(self, self._ready.popleft())
                if self.busy and self.transport is not None:
                    # On a request thread, or waiting on this one for the loop's group commit:
                    # read no more until it answers. (Skipping this pause for a request waiting
                    # two loop turns saved nothing measurable: A/B under load, same minutes.)
                    # Answered at once on this thread: nothing was read, no epoll change to undo.
                    self.transport.pause_reading()
        finally:
            self._in_next = False
        if self.busy or self.closing or self.transport is None:
            return
        if self.stopped:
            self.closing = True
            if self._last_answer is not None:
                self.transport.write(self._last_answer)
            self.transport.close()
            return
        if not self.reading:
            self.deadline = time.monotonic() + self.worker.keepalive
        self.transport.resume_reading()

    def answered(self, answer: bytes, keep_alive: bool) -> None:
        """The worker's answer to the request handed over last (on the loop's thread)."""
        self.busy = False
        if self.closing or self.transport is None:
            return
        self.transport.write(answer)
        if not keep_alive:
            self.closing = True
            self.transport.close()
            return
        self._next()

    def expire(self, now: float) -> None:
        """At the loop's rounds: a request not complete in time is answered 408; an idle one closed."""
        if self.busy or self._ready or self.closing or now < self.deadline or self.transport is None:
            return
        self.closing = True
        if self.reading:
            self.transport.write(_TIMEOUT_ANSWER)
        self.transport.close()

    def close_if_idle(self) -> None:
        """Shutting down: close a connection with no request in progress (a partial one included)."""
        if not self.busy and not self._ready and self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()


class LoopWorker(Worker):  # type: ignore[misc]
    """A gunicorn worker serving every connection from one asyncio loop (module docstring)."""

    read_timeout = READ_TIMEOUT_SECONDS
    idle_grace = IDLE_GRACE_SECONDS
    alive: bool  # gunicorn's: False once the worker is told to stop

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[Connection] = set()
        self.keepalive = float(self.cfg.keepalive)
        self._slot: int | None = None
        self._accepting = False
        self._opening = 0  # accepted, connection not made yet
        self._date = (0, "")
        self.threads = max(1, self.cfg.threads)
        # Requests with a thread now. An app with the hint never queues for one: with every thread
        # taken, a request runs on the loop (where the relay answers 202), since a queued one would
        # wait for a thread, then for the GIL behind the loop's own requests.
        self._on_threads = 0
        # Whether the loop ran its last rounds BEHIND_SECONDS late, busy (BEHIND_BUSY): it has more
        # requests than it can take at once, and an app with the hint gets no threads meanwhile.
        self.behind = False
        self._stopping_at: float | None = None  # when shutdown began (monotonic)
        # Between requests, the accept rules are looked at once per LOOK_SECONDS, not per request:
        # an accept() that finds nobody waiting and a scan of the connection table were 10 % of the
        # server's own CPU per request. _least: the table's least count, as last looked at.
        self._look_again_at = 0.0
        self._least: int | None = None
        # What every request's environ holds, whatever the request (copied, then filled in).
        self._environ_base: dict[str, Any] = {
            "SCRIPT_NAME": "",
            "SERVER_SOFTWARE": "pingtree-relay",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self.cfg.is_ssl else "http",
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.cfg.workers > 1,
            "wsgi.run_once": False,
        }
        self._rounds_at = (0.0, 0.0)  # (wall, the loop thread's CPU) at the last rounds

    # --- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        freeze_what_is_loaded()  # the app is loaded (init_process): keep it out of full GC passes
        self._slot = CONNECTIONS.claim(self.age, os.getpid())
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        _loop_threads.add(threading.get_ident())
        group_commit.serve(self.loop)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="request")
        extensions = getattr(self.wsgi, "extensions", None)
        self.wants_thread: Callable[[dict[str, Any]], bool] | None = (
            extensions.get("wants_thread") if isinstance(extensions, dict) else None
        )
        self.ssl = None
        if self.cfg.is_ssl:
            from gunicorn.sock import ssl_context

            self.ssl = ssl_context(self.cfg)
        self.listeners = [getattr(s, "sock", s) for s in self.sockets]
        self._server_names: dict[socket.socket, tuple[str, str]] = {}  # SERVER_NAME, SERVER_PORT
        for listener in self.listeners:
            listener.setblocking(False)
            name = listener.getsockname()
            self._server_names[listener] = (
                (str(name[0]), str(name[1])) if isinstance(name, tuple) else (str(name), "")
            )
        self.loop.add_reader(self.PIPE[0], self._on_signal)  # gunicorn's wakeup fd for signals
        self._accept_on(True)
        self._rounds_at = (time.monotonic(), time.thread_time())
        self.loop.call_soon(self._rounds)
        try:
            self.loop.run_forever()
        finally:
            _loop_threads.discard(threading.get_ident())
            CONNECTIONS.clear(self._slot)
            self.pool.shutdown(wait=False)

    def _on_signal(self) -> None:
        try:
            while os.read(self.PIPE[0], 64):
                pass
        except BlockingIOError:
            pass
        if not self.alive:
            self._rounds()

    def _rounds(self) -> None:
        """Every TICK_SECONDS: the heartbeat, deadlines, fair accept, and shutdown when asked."""
        self.notify()
        now = time.monotonic()
        cpu = time.thread_time()  # of this thread: the loop's
        (then, then_cpu), self._rounds_at = self._rounds_at, (now, cpu)
        busy = (cpu - then_cpu) >= BEHIND_BUSY * (now - then)
        self.behind = busy and now - then - TICK_SECONDS > BEHIND_SECONDS
        for conn in list(self.connections):
            conn.expire(now)
        if self.alive and os.getppid() != self.ppid:
            self.log.info("Parent changed, shutting down: %s", self)
            self.alive = False
        if not self.alive:
            if self._stopping_at is None:  # once: _shut_down then runs its own rounds
                self._shut_down()
            return
        self._publish()
        self._accept_on(self._fair_to_accept())
        self.loop.call_later(TICK_SECONDS, self._rounds)

    def _shut_down(self) -> None:
        """Stop accepting, close what is idle (after ``idle_grace`` seconds: meanwhile a request on
        it is answered with ``Connection: close``), and stop the loop once nothing is in progress.

        A connection accepted but not yet open (``_opening``: its task runs on a later loop turn) is
        in progress too, and once open it gets a grace of its own (its request may not be read
        yet): stopping the loop under it dropped the socket with the client's request unread, and
        the client read a reset (a red CI run: a poll through a SIGHUP's restart)."""
        now = time.monotonic()
        if self._stopping_at is None:
            self._stopping_at = now
        self._accept_on(False)
        self._publish()
        in_grace = False  # a connection within idle_grace of the signal (or of its opening, if later)
        for conn in list(self.connections):
            if now - max(self._stopping_at, conn.opened_at) < self.idle_grace:
                in_grace = True
            else:
                conn.close_if_idle()
        busy = self._opening or any(conn.busy or conn._ready for conn in self.connections)
        if in_grace or busy:
            self.loop.call_later(TICK_SECONDS, self._shut_down)
            self.notify()
            return
        self.loop.stop()

    # --- accepting (fair accept: module docstring) ---------------------------------------------------

    def _accept_on(self, on: bool) -> None:
        on = on and self.alive and self._count() < self.cfg.worker_connections
        if on == self._accepting:
            return
        self._accepting = on
        for listener in self.listeners:
            if on:
                self.loop.add_reader(listener, self._accept, listener)
            else:
                self.loop.remove_reader(listener)

    def _accept(self, listener: socket.socket) -> None:
        """Take the connections waiting, up to ACCEPT_BURST past this worker's fair share.

        More than one per call: a busy loop comes back here once per turn, and a turn can take a
        few hundred ms under load; one connection a turn left a burst of 500 new connections (a
        load balancer's pool filling up) waiting in the kernel for tens of seconds, past clients'
        timeouts (measured: 13 to 38 of them at 1,000 events/s offered)."""
        room: int | None = None  # looked up after the first accept: most calls find none waiting
        while room is None or room > 0:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # none left, or another worker took it
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._opening += 1
            self.loop.create_task(self._open(sock, self._server_names[listener]))
            if room is None:
                least = CONNECTIONS.least()
                room = ACCEPT_BURST if least is None else least + FAIR_SLACK + ACCEPT_BURST - self._count()
            room -= 1

    async def _open(self, sock: socket.socket, server: tuple[str, str]) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: Connection(self, server), sock, ssl=self.ssl)
        except (OSError, ValueError) as exc:  # the client left already; a failed TLS handshake
            self.log.debug("connection not opened: %s", exc)
            sock.close()
        finally:
            self._opening -= 1

    def _count(self) -> int:
        """Connections this worker holds, those accepted but not yet open included."""
        return len(self.connections) + self._opening

    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self._publish()
        if not self._fair_to_accept():
            self._accept_on(False)  # the rounds ask again

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self._publish()
        self._reconsider_accepting()

    def _reconsider_accepting(self) -> None:
        """A worker that stopped accepting asks again between requests (every ``LOOK_SECONDS`` at
        most) and at each close, not only at its rounds: the other workers may have stopped too
        (each above the other's count, as published a moment ago), and a client connecting
        meanwhile would wait for the next round."""
        if not self._accepting and self.alive:
            self._accept_on(self._fair_to_accept())

    def _publish(self) -> None:
        if self._slot is not None:
            CONNECTIONS.publish(self._slot, os.getpid(), accepting=self.alive, connections=self._count())

    def _fair_to_accept(self) -> bool:
        least = CONNECTIONS.least()
        return least is None or self._count() <= least + FAIR_SLACK

    # --- requests -----------------------------------------------------------------------------------

    def handle(self, conn: Connection, request: _Request) -> None:
        """Answer ``request`` of ``conn``: on this thread, or on a request thread if it may wait."""
        now = time.monotonic()
        if now >= self._look_again_at:  # between requests too, not only once per loop turn
            self._look_again_at = now + LOOK_SECONDS
            self._least = CONNECTIONS.least()
            self._reconsider_accepting()
            if self._accepting:  # see _accept
                for listener in self.listeners:
                    self._accept(listener)
        environ = self._environ(conn, request)
        keep_alive = request.keep_alive and self.alive
        if (
            keep_alive
            and len(self.connections) > SHED_MARGIN
            and over_share(len(self.connections), self._least)
        ):
            keep_alive = False  # the client reconnects to a less loaded worker (module docstring)
        if self.on_a_thread(environ):
            self._on_threads += 1
            future = self.pool.submit(self._call, environ, request, keep_alive)
            future.add_done_callback(
                lambda f: self.loop.call_soon_threadsafe(self._deliver, conn, f, keep_alive)
            )
            return
        group_commit.run(self._answer, conn, environ, request, keep_alive)

    def _answer(self, conn: Connection, environ: dict[str, Any], request: _Request, keep_alive: bool) -> None:
        """Run the app for ``request`` on the loop's thread and answer it: in a greenlet of its own
        (:func:`server.group_commit.run`), so that its store write can wait for the loop turn's
        group commit while the loop serves the other requests."""
        answer, keep_alive = self._call(environ, request, keep_alive)
        try:
            conn.answered(answer, keep_alive)
        except Exception:  # nothing of it may escape: it would land in the greenlet that started
            # this one (the request before it on a keep-alive connection, or the loop)
            self.log.exception("Error answering request %s", environ.get("RAW_URI"))
            if conn.transport is not None:
                conn.transport.abort()

    def on_a_thread(self, environ: dict[str, Any]) -> bool:
        """Whether this request runs on a request thread rather than the loop's (module docstring)."""
        if self.wants_thread is None:
            return True
        return not self.behind and self._on_threads < self.threads and self.wants_thread(environ)

    def _deliver(self, conn: Connection, future: Any, keep_alive: bool) -> None:
        self._on_threads -= 1
        try:
            answer, keep_alive = future.result()
        except BaseException:  # _call answers every error itself; this is a bug's last resort
            self.log.exception("Error handling request")
            answer, keep_alive = _SERVER_ERROR_ANSWER, False
        conn.answered(answer, keep_alive)

    def _environ(self, conn: Connection, request: _Request) -> dict[str, Any]:
        raw = request.url.decode("latin-1")
        path, _, query = raw.partition("?")
        if path.startswith(("http://", "https://")):  # absolute form (RFC 9112 3.2.2)
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        path, _, _ = path.partition("#")
        body = b"".join(request.body)
        environ = self._environ_base.copy()
        environ["REQUEST_METHOD"] = request.method
        environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1")
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = environ["REQUEST_URI"] = raw
        environ["SERVER_NAME"], environ["SERVER_PORT"] = conn.server
        environ["SERVER_PROTOCOL"] = f"HTTP/{request.version}"
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = conn.peer
        environ["wsgi.input"] = io.BytesIO(body)
        if not request.oversize:
            environ[WHOLE_BODY] = body
        chunked = False
        for name, value in request.headers:
            key = _environ_key(name)
            if not key:
                continue
            text = value.decode("latin-1").strip()
            if key == "HTTP_TRANSFER_ENCODING":
                chunked = True
            if key in environ and key.startswith("HTTP_"):
                environ[key] = f"{environ[key]},{text}"  # a repeated header: its values joined
            else:
                environ[key] = text
        if chunked:  # de-chunked here: all of it, or (oversize) as far as it came
            environ.pop("CONTENT_LENGTH", None)
            if not request.oversize:
                environ["CONTENT_LENGTH"] = str(len(body))
        return environ

    def _call(self, environ: dict[str, Any], request: _Request, keep_alive: bool) -> tuple[bytes, bool]:
        """Run the app for one request; its whole answer as bytes, and whether to keep the connection."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return written.append

        written: list[bytes] = []
        try:
            result: Iterable[bytes] = self.wsgi(environ, start_response)
            try:
                written.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            self.log.exception("Error handling request %s", environ.get("RAW_URI"))
            return _SERVER_ERROR_ANSWER, False
        if not started:
            self.log.error("The app gave no status for %s", environ.get("RAW_URI"))
            return _SERVER_ERROR_ANSWER, False
        status, headers = started
        body = b"".join(written)
        code = int(status[:3])
        lines = [f"HTTP/1.1 {status}\r\n"]
        has_length = False
        for name, value in headers:
            lowered = name.lower()
            if lowered in ("connection", "transfer-encoding", "keep-alive"):
                continue  # hop-by-hop: this server's to say
            if lowered == "content-length":
                has_length = True
            lines.append(f"{name}: {value}\r\n")
        if not has_length and code not in _NO_BODY_STATUSES and code >= 200:
            lines.append(f"Content-Length: {len(body)}\r\n")
        if request.oversize or not self.alive:
            keep_alive = False  # the rest of its body was never read; or this worker is stopping
        lines.append(f"Date: {self._http_date()}\r\n")
        if not keep_alive:
            lines.append("Connection: close\r\n")
        elif request.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        if code in _NO_BODY_STATUSES or request.method == "HEAD":
            body = b""
        return head + body, keep_alive

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]
