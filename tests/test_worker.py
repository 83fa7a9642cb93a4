"""The gunicorn worker (server/worker.py): HTTP/1.1 on one event loop, the app on the loop's thread
or on a request thread as the app's hint says.

A real gunicorn master and one LoopWorker (tests/loop_worker_app.py) on 127.0.0.1; raw sockets where
the bytes on the wire are the point (pipelining, 100-continue, limits), httpx elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.servers import REPORT_PORT, Server, wait_for
from server import worker
from server.worker import BODY_LIMIT, HEAD_LIMIT

KEEPALIVE_SECONDS = 1


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    args = [
        sys.executable,
        "-m",
        "tests.loop_worker_app",
        *REPORT_PORT,
        "--keepalive",
        str(KEEPALIVE_SECONDS),
    ]
    with Server(args, tmp_path / "loop-worker.log") as srv:
        yield srv


def _connect(srv: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return sock


def _read_answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` answers read off ``sock``: (status, headers lower-cased, body), by Content-Length."""
    buf, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed after {len(answers)} answers: {buf!r}")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("closed inside a body")
            buf += chunk
        answers.append((status, headers, buf[:length]))
        buf = buf[length:]
    return answers


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (reads EOF within its timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_requests_are_answered_in_order_wherever_each_runs(server: Server) -> None:
    with _connect(server) as sock:
        # The first waits on a thread; the two behind it (one for the loop's thread) wait their turn.
        sock.sendall(
            b"GET /slow?seconds=0.3 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /where?thread HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        (s1, _, b1), (s2, _, b2), (s3, _, b3) = _read_answers(sock, 3)
    assert (s1, s2, s3) == (200, 200, 200)
    assert b'"may_wait":true' in b1
    assert b'"body":"abc"' in b2
    assert b'"may_wait":true' in b3


def test_the_app_runs_on_the_loop_thread_unless_its_hint_says_it_may_wait(server: Server) -> None:
    on_loop = httpx.get(server.url + "/where").json()
    on_thread = httpx.get(server.url + "/where?thread").json()
    assert on_loop["may_wait"] is False and on_loop["thread"] == "MainThread"
    assert on_thread["may_wait"] is True and on_thread["thread"].startswith("request")


def _commits_read_together(
    srv: Server, count: int, hold: Path, while_held: Callable[[], None] = lambda: None
) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` ``POST /commit`` requests, each on a connection of its own, the first holding the
    worker's loop until ``hold`` exists: the others are then read together after it. ``while_held``
    runs once all are sent, before the hold is let go. Their answers, in order."""
    socks = [_connect(srv) for _ in range(count)]
    try:
        for sock in socks:  # every connection open before the requests go
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert _read_answers(sock, 1)[0][0] == 200
        request = b"POST /commit%s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
        socks[0].sendall(request % (b"?hold_until=" + str(hold).encode()))
        for sock in socks[1:]:
            sock.sendall(request % b"")
        while_held()
        hold.touch()
        return [_read_answers(sock, 1)[0] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_requests_on_the_loop_read_together_wait_for_one_group_commit(server: Server, tmp_path: Path) -> None:
    answers = [json.loads(body) for _, _, body in _commits_read_together(server, 10, tmp_path / "nine-sent")]
    assert answers == [{"waited": True, "commits": 1}] * 10  # each answered after the one commit
    on_thread = httpx.post(server.url + "/commit?thread").json()
    assert on_thread["waited"] is False  # a request thread commits by itself


def test_sigterm_while_requests_wait_for_a_group_commit_answers_each_after_its_commit(tmp_path: Path) -> None:
    """Requests parked for the loop's group commit when the worker is told to stop are in progress:
    the loop runs on until the commit, each is answered (with Connection: close), then it exits.
    With no idle grace, so that only their being in progress keeps the loop running."""
    args = [sys.executable, "-m", "tests.loop_worker_app", *REPORT_PORT, "--idle-grace", "0"]
    with Server(args, tmp_path / "loop-worker.log") as srv:
        (pid,) = srv.worker_pids()
        # The worker itself gets SIGTERM inside the hold: its handler runs on the loop's thread (the
        # signal interrupts the hold's sleep) before the hold can see the file. So the shutdown
        # begins with the five requests read in or on their way, and waiting for the one commit.
        answers = _commits_read_together(srv, 5, tmp_path / "signalled", lambda: os.kill(pid, signal.SIGTERM))
        assert [(status, json.loads(body)) for status, _, body in answers] == [
            (200, {"waited": True, "commits": 1})
        ] * 5
        assert [headers.get("connection") for _, headers, _ in answers] == ["close"] * 5
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)  # the master: its worker is gone, so it may go too
        assert srv.proc.wait(20) == 0


def test_pipelined_requests_each_waiting_for_a_commit_are_answered_in_order(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /commit HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" * 3
            + b"GET /where HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        answers = [json.loads(body) for _, _, body in _read_answers(sock, 4)]
    assert [a.get("waited") for a in answers[:3]] == [True] * 3
    assert [a["commits"] for a in answers[:3]] == sorted({a["commits"] for a in answers[:3]})  # one each
    assert answers[3]["may_wait"] is False


def test_the_environ_holds_the_request_as_wsgi_says(server: Server) -> None:
    """PEP 3333's keys; a repeated header's values joined; a name with an underscore dropped (it
    would pass for the dashed one); Content-Type and -Length without the HTTP_ prefix."""
    with _connect(server) as sock:
        for _ in range(2):  # the second time, the header names are known to the worker
            sock.sendall(
                b"GET /environ?a=1&b=%20 HTTP/1.1\r\nHost: relay.test\r\nAccept: text/html\r\n"
                b"X-Forwarded-For: 10.0.0.1\r\nX_Forwarded_For: 6.6.6.6\r\naccept: */*\r\n"
                b"Content-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
            )
            ((status, _, body),) = _read_answers(sock, 1)
            assert status == 200
            environ = json.loads(body)
            assert environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/environ"
            assert environ["QUERY_STRING"] == "a=1&b=%20" and environ["SERVER_PROTOCOL"] == "HTTP/1.1"
            assert environ["REMOTE_ADDR"] == "127.0.0.1" and environ["wsgi.url_scheme"] == "http"
            assert environ["HTTP_HOST"] == "relay.test"
            assert environ["HTTP_ACCEPT"] == "text/html,*/*"
            assert environ["HTTP_X_FORWARDED_FOR"] == "10.0.0.1"
            assert environ["CONTENT_TYPE"] == "text/plain" and environ["CONTENT_LENGTH"] == "0"
            assert "HTTP_CONTENT_TYPE" not in environ


def test_the_worker_remembers_a_bounded_number_of_header_names() -> None:
    """A client sending random header names cannot grow a worker's memory."""
    for n in range(worker._ENVIRON_KEYS_MAX + 10):
        assert worker._environ_key(f"X-Random-{n}".encode()) == f"HTTP_X_RANDOM_{n}"
        assert len(worker._ENVIRON_KEYS) <= worker._ENVIRON_KEYS_MAX
    assert worker._environ_key(b"X-Random-9999") == "HTTP_X_RANDOM_9999"  # past the bound: still right
    assert worker._environ_key(b"content-length") == "CONTENT_LENGTH"
    assert worker._environ_key(b"X_Forwarded_For") == ""


def test_what_the_worker_loaded_before_serving_is_frozen_out_of_full_collections(server: Server) -> None:
    """server/heap.py: the app and its modules are not walked by every full GC pass (a stall)."""
    collector = httpx.get(server.url + "/gc").json()
    assert collector["frozen"] > 10_000  # Flask, gunicorn, the app: tens of thousands of objects


def test_a_request_waiting_on_a_thread_does_not_hold_up_the_others(server: Server) -> None:
    slow: list[float] = []

    def call_slow() -> None:
        started = time.monotonic()
        httpx.get(server.url + "/slow?seconds=2", timeout=10).raise_for_status()
        slow.append(time.monotonic() - started)

    waiter = threading.Thread(target=call_slow)
    waiter.start()
    try:
        wait_for(lambda: _in_flight(server), timeout=10, message="the slow request to be with a thread")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            answered = [client.post("/echo", content=b"x").status_code for _ in range(20)]
        assert answered == [200] * 20
        assert not slow, "the fast requests were answered only after the slow one"
    finally:
        waiter.join()
    assert slow and slow[0] >= 2


def _in_flight(srv: Server) -> bool:
    """Whether a request is sleeping in /slow now (asked on the loop's thread)."""
    return bool(httpx.get(srv.url + "/sleeping").json()["sleeping"] >= 1)


def test_a_chunked_body_reaches_the_app_whole_and_100_continue_is_sent(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        ((status, _, body),) = _read_answers(sock, 1)
        assert status == 200 and b'"body":"abcde"' in body and b'"length":5' in body
        assert b'"whole":true' in body  # the body read whole is handed over as such too (WHOLE_BODY)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"wxyz")
        ((status, _, body),) = _read_answers(sock, 1)
        assert status == 200 and b'"body":"wxyz"' in body and b'"whole":true' in body


def test_head_has_the_length_of_get_and_no_body(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.settimeout(5)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"ok"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    head_answer, get_answer = data.split(b"HTTP/1.1 200")[1:]
    assert b"Content-Length: 2\r\n" in head_answer and head_answer.endswith(b"\r\n\r\n")
    assert get_answer.endswith(b"\r\n\r\nok")


def test_http_1_0_is_closed_after_its_answer_unless_it_asks_to_keep_alive(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        ((status, headers, body),) = _read_answers(sock, 1)
        assert (status, body, headers["connection"]) == (200, b"ok", "close")
        assert _closed(sock)
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        ((status, headers, _),) = _read_answers(sock, 1)
        assert headers["connection"] == "keep-alive"
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert _read_answers(sock, 1)[0][0] == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * (HEAD_LIMIT + 10) + b"\r\n\r\n", 431),
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        # Past the worker's limit: handed to the app at once, which refuses it from the header alone.
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (BODY_LIMIT + 1), 413),
    ],
    ids=["head-too-large", "garbage", "two-lengths", "length-and-chunked", "declared-too-large"],
)
def test_what_cannot_be_served_is_refused_and_the_connection_closed(
    server: Server, request_bytes: bytes, status: int
) -> None:
    with _connect(server) as sock:
        sock.sendall(request_bytes)
        ((got, headers, _),) = _read_answers(sock, 1)
        assert got == status
        assert headers.get("connection") == "close"
        assert _closed(sock)


def test_a_chunked_body_past_the_limit_reaches_the_app_cut_and_the_connection_is_closed(
    server: Server,
) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):  # 4 x BODY_LIMIT / 2: twice the limit, in pieces as a client sends them
            sock.sendall(b"%x\r\n" % (BODY_LIMIT // 2) + b"a" * (BODY_LIMIT // 2) + b"\r\n")
        ((status, headers, body),) = _read_answers(sock, 1)
        assert status == 200 and headers.get("connection") == "close"
        length = int(body.split(b'"length":')[1].split(b",")[0])
        assert BODY_LIMIT < length < 2 * BODY_LIMIT  # what came until the limit, not the rest
        assert b'"whole":null' in body  # a body cut short is never passed off as whole
        assert _closed(sock)


def test_a_request_after_a_refused_one_in_the_same_buffer_is_not_served(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        (first, second) = _read_answers(sock, 2)
        assert (first[0], second[0]) == (200, 400)
        assert _closed(sock)


def test_an_idle_kept_alive_connection_is_closed_after_keepalive_seconds(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        _read_answers(sock, 1)
        started = time.monotonic()
        assert _closed(sock)  # the socket's timeout (10 s) is far longer than keepalive
        assert time.monotonic() - started >= KEEPALIVE_SECONDS * 0.9


def test_sigterm_finishes_the_request_in_progress_then_the_worker_exits(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /slow?seconds=1.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: _in_flight(server), timeout=10, message="the slow request to be with a thread")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)  # the master passes it on to its worker
        ((status, headers, body),) = _read_answers(sock, 1)
        assert status == 200 and b'"may_wait":true' in body
        assert headers.get("connection") == "close"  # a stopping worker keeps nothing alive
    assert server.proc.wait(20) == 0


def test_at_sigterm_a_connection_idle_through_the_signal_is_answered_then_closed(tmp_path: Path) -> None:
    """A pooled keep-alive connection, idle when the worker is told to stop and reused a moment later,
    gets its answer (with Connection: close), not a reset: idle connections are closed only after
    the worker's ``idle_grace`` (here 5 s, so that the test does not depend on the machine's speed)."""
    args = [sys.executable, "-m", "tests.loop_worker_app", *REPORT_PORT, "--idle-grace", "5"]
    with Server(args, tmp_path / "loop-worker.log") as srv, _connect(srv) as idle, _connect(srv) as probe:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _read_answers(idle, 1)[0][0] == 200  # kept alive, then idle through the signal
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # the probe's requests, back to back, until the worker says it is stopping
            assert time.monotonic() < deadline, "the worker never said close"
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            ((status, headers, _),) = _read_answers(probe, 1)
            assert status == 200
            if headers.get("connection") == "close":
                break
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        ((status, headers, _),) = _read_answers(idle, 1)  # closed at the signal, this reads EOF
        assert status == 200 and headers.get("connection") == "close"
        assert _closed(idle)
        assert srv.proc.wait(20) == 0  # nothing left open: it exits without waiting out the grace


def test_at_sigterm_a_connection_accepted_but_not_yet_open_is_served(tmp_path: Path) -> None:
    """The worker holds no open connection when told to stop, but has just accepted one (its task
    to open it has not run yet): it opens and serves it before it exits, instead of exiting under
    it (the client read a reset). Each connection accepted after /delay-opens waits 1 s before it
    is opened here, so the signal surely lands in between."""
    args = [sys.executable, "-m", "tests.loop_worker_app", *REPORT_PORT]
    with Server(args, tmp_path / "loop-worker.log") as srv:
        assert httpx.get(srv.url + "/delay-opens?seconds=1").status_code == 200
        with _connect(srv) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_for(
                lambda: "accepted, not open yet" in srv.log_path.read_text(errors="replace"),
                message="the connection accepted",
            )
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGTERM)
            ((status, headers, body),) = _read_answers(sock, 1)
            assert status == 200 and body == b"ok"
            assert headers.get("connection") == "close"
        assert srv.proc.wait(20) == 0


def test_with_every_thread_taken_a_request_that_wants_one_runs_on_the_loop(server: Server) -> None:
    waiters = [
        threading.Thread(target=lambda: httpx.get(server.url + "/slow?seconds=2", timeout=10))
        for _ in range(2)
    ]
    for waiter in waiters:
        waiter.start()
    try:
        wait_for(
            lambda: httpx.get(server.url + "/sleeping").json()["sleeping"] == 2,
            timeout=10,
            message="both request threads asleep in /slow",
        )
        # It would rather have a thread; queued for one, it would wait 2 s. On the loop: at once.
        assert httpx.get(server.url + "/where?thread", timeout=1).json()["may_wait"] is False
    finally:
        for waiter in waiters:
            waiter.join()


def test_a_loop_behind_with_its_rounds_gives_no_request_a_thread() -> None:
    """The rule alone (a saturated loop cannot be made on demand without timing): ``behind``, set
    by the rounds when they run late, and the other two rules of ``on_a_thread``."""
    from server.worker import LoopWorker

    worker = LoopWorker.__new__(LoopWorker)  # the rule needs none of a running worker's state
    worker.wants_thread, worker.behind, worker._on_threads, worker.threads = (
        (lambda environ: True),
        False,
        0,
        2,
    )
    assert worker.on_a_thread({})
    worker.behind = True
    assert not worker.on_a_thread({})
    worker.behind, worker._on_threads = False, 2
    assert not worker.on_a_thread({})
    worker._on_threads, worker.wants_thread = 0, (lambda environ: False)
    assert not worker.on_a_thread({})
    worker.wants_thread = None  # an app without the hint: every request on a thread, as gthread
    worker.behind, worker._on_threads = True, 2
    assert worker.on_a_thread({})
