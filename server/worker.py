"""The gunicorn worker: ``gthread``, except that a request is read whole before a thread takes it.

Why: stock gthread hands a connection to a thread as soon as its first bytes arrive, and the thread
then blocks reading the rest. A few dozen clients sending their headers or body one byte at a time
("slowloris") hold every thread, and every legitimate request waits. Here the worker's selector
loop (one thread, non-blocking sockets) buffers each request until its head and body are complete,
and only then gives it to a thread, whose parser finds it all in memory. A request not complete
within ``read_timeout`` seconds of its first byte (or of the connection, when none comes) is
answered 408 and closed: a slow client costs a socket and a buffer, never a thread.

Bounds: a head larger than ``HEAD_LIMIT`` or a declared body larger than ``BODY_LIMIT`` is handed
over as it is (gunicorn or the app refuse it at once: 431/400, 413); so is a chunked body larger than
``BODY_LIMIT``. The nginx in docs/deployment.md does the same job in front with
``client_header_timeout`` and ``client_body_timeout``.

Fair accept: gunicorn's workers share one listening socket, and whichever is awake first accepts.
A burst of new keep-alive connections (a load balancer's pool, nginx's ``keepalive``, a load
generator) can all land on one worker: measured at 300 ms upstream, one of four workers held 442 of
500 connections and two held none, so one process (one GIL, one core) did the whole box's work.
Each worker therefore publishes its open connections in a small table shared by every worker of
one master (:class:`ConnectionTable`, anonymous shared memory made before the fork), and stops
accepting while it holds more than the least-loaded live worker plus one. The least-loaded worker
always accepts, so a connection never waits for a worker to change its mind. Connections a worker
took before the others were up (the first worker to boot gets every early connection) are moved
the safe way: a worker holding more than twice the least-loaded worker's connections answers its next request with ``Connection: close``
(RFC 9112 section 9.6), and the client's new connection goes to a worker below it. Nothing is cut
mid-request and no idle connection is closed under a client that may be sending on it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import selectors
import socket
import struct
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

READ_TIMEOUT_SECONDS = 10.0
HEAD_LIMIT = 64 * 1024
BODY_LIMIT = 64 * 1024  # larger than any event body the relay accepts (relay.max_body_bytes)

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d+)[ \t]*(?=\r\n|$)")
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*chunked")
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect[ \t]*:[ \t]*100-continue")
_TIMEOUT_BODY = b'{"status":408,"type":"error","message":"Request timeout"}'
_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


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


SHED_MARGIN = 32  # connections a worker may hold above twice the least loaded's before it sheds


def over_share(mine: int, least: int | None) -> bool:
    """Whether a worker holding ``mine`` connections should hand one back (``Connection: close``).

    Much wider than the accept rule (more than twice the least-loaded worker's, plus 32): only a
    gross imbalance, such as every connection of a burst taken before the other workers were up,
    moves connections; the ordinary unevenness of a burst (counts published up to a loop turn
    late) is left for the accept rule to even out."""
    return least is not None and mine > 2 * least + SHED_MARGIN


@dataclass
class _Reading:
    """A connection whose request is being buffered by the selector loop."""

    conn: Any  # gunicorn's TConn
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    sent_continue: bool = False


def request_complete(data: bytes | bytearray) -> tuple[bool, bool]:
    """``(complete, wants_continue)`` for the bytes of one HTTP/1.x request received so far.

    "Complete" also means "hand it over as it is": past a limit, or a head that cannot be
    understood here, the real parser decides (and refuses it).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return len(data) > HEAD_LIMIT, False
    head, body = bytes(data[:end]).lower(), len(data) - end - 4
    if _CHUNKED.search(head):
        return b"0\r\n\r\n" in data[end:] or body > BODY_LIMIT, bool(_EXPECT_CONTINUE.search(head))
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) != 1:
        return True, False  # no body, or conflicting lengths (gunicorn answers 400)
    declared = int(lengths[0])
    if declared > BODY_LIMIT:
        return True, False  # the app answers 413 from the header alone
    return body >= declared, body < declared and bool(_EXPECT_CONTINUE.search(head))


class ReadAheadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread whose connections reach a thread only with a complete request (module docstring)."""

    read_timeout = READ_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading: dict[int, _Reading] = {}  # by id(conn)
        self._slot: int | None = None

    # --- fair accept (module docstring) ----------------------------------------------------------

    def run(self) -> None:
        self._slot = CONNECTIONS.claim(self.age, os.getpid())
        try:
            super().run()
        finally:
            CONNECTIONS.clear(self._slot)

    def _publish(self) -> None:
        if self._slot is not None:
            CONNECTIONS.publish(self._slot, os.getpid(), accepting=self.alive, connections=self.nr_conns)

    def _fair_to_accept(self) -> bool:
        least = CONNECTIONS.least()
        return least is None or self.nr_conns <= least + FAIR_SLACK

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's loop calls this whenever it wants accepting on or off (each turn while the two
        differ): turning it on is also the moment to ask whether this worker is the one to accept."""
        self._publish()
        super().set_accept_enabled(enabled and self.alive and self._fair_to_accept())

    def accept(self, listener: socket.socket) -> None:
        super().accept(listener)
        self._publish()
        if not self._fair_to_accept():
            super().set_accept_enabled(False)  # the loop asks again on its next turn

    def handle_request(self, req: Any, conn: Any) -> Any:
        """In a request thread: a worker above its share answers this request with
        ``Connection: close``, so the client reconnects to a less loaded worker."""
        # The table is read only when the answer could be yes (never with SHED_MARGIN or fewer).
        if self.alive and self.nr_conns > SHED_MARGIN and over_share(self.nr_conns, CONNECTIONS.least()):
            req.must_close = True
        return super().handle_request(req, conn)

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        self._publish()  # once per loop turn at least: the heartbeat, and closed connections

    def enqueue_req(self, conn: Any) -> None:
        """Every path to a thread (new, kept-alive, leftover bytes) comes through here."""
        if self.cfg.is_ssl:  # TLS in gunicorn itself: the socket's bytes are not the request yet
            super().enqueue_req(conn)
            return
        pending = bytearray()
        if conn.parser is not None:  # bytes the parser already read past the previous request
            pending += conn.parser.unreader.buf.getvalue()
            conn.parser.unreader.buf.seek(0)
            conn.parser.unreader.buf.truncate()
        reading = _Reading(conn, time.monotonic() + self.read_timeout, pending)
        if reading.data and request_complete(reading.data)[0]:
            self._hand_over(reading)
            return
        conn.sock.setblocking(False)
        self._reading[id(conn)] = reading
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, reading))

    def _on_readable(self, reading: _Reading, sock: socket.socket) -> None:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client went away
            self._forget(reading)
            self._close(reading.conn)
            return
        reading.data += chunk
        complete, wants_continue = request_complete(reading.data)
        if complete:
            self._forget(reading)
            self._hand_over(reading)
        elif wants_continue and not reading.sent_continue:
            reading.sent_continue = True  # the client waits for this before it sends the body
            self._send_quietly(sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _hand_over(self, reading: _Reading) -> None:
        conn = reading.conn
        conn.init()  # the parser, as the thread would make it (plain HTTP/1.x)
        conn.parser.unreader.unread(bytes(reading.data))
        conn.data_ready = True
        super().enqueue_req(conn)

    def _forget(self, reading: _Reading) -> None:
        self._reading.pop(id(reading.conn), None)
        try:
            self.poller.unregister(reading.conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _close(self, conn: Any) -> None:
        self.nr_conns -= 1
        conn.close()

    @staticmethod
    def _send_quietly(sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EPIPE, errno.ECONNRESET):
                raise

    def murder_pending(self) -> None:
        """Also close the requests that took longer than ``read_timeout`` to arrive (408)."""
        super().murder_pending()
        now = time.monotonic()
        # A stopping worker does not wait for requests nobody has started sending.
        expired = [r for r in self._reading.values() if r.deadline <= now or (not self.alive and not r.data)]
        for reading in expired:
            self._forget(reading)
            if reading.data:  # a client that never sent a byte gets no answer, like nginx's 408
                self._send_quietly(reading.conn.sock, _TIMEOUT_ANSWER)
            self._close(reading.conn)


def with_read_timeout(seconds: float) -> type[ReadAheadWorker]:
    """The worker class with another ``read_timeout`` (the class is inherited by forked workers)."""
    return type("ReadAheadWorker", (ReadAheadWorker,), {"read_timeout": seconds})
