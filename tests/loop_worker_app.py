"""A small app served by server/worker.py's LoopWorker, for tests/test_worker.py.

``wants_thread`` sends ``/slow`` and any request with ``?thread`` to a request thread; the rest
run on the loop's thread. ``/where`` says where it ran; ``/sleeping``, how many are in ``/slow``;
``/gc``, what the collector has frozen; ``/commit`` waits for a group commit (server/group_commit.py);
``/environ``, the WSGI environ it got; ``/delay-opens``, see :func:`_worker_class`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request

from server import group_commit
from server.worker import IDLE_GRACE_SECONDS, WHOLE_BODY, LoopWorker, may_wait


def create_app() -> Flask:
    app = Flask("loop_worker_app")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    @app.get("/where")
    def where() -> Response:
        return jsonify(may_wait=may_wait(), thread=threading.current_thread().name)

    @app.post("/echo")
    def echo() -> Response:
        if (request.content_length or 0) > 1024:
            return Response("too large", status=413)
        body = request.get_data()
        whole = request.environ.get(WHOLE_BODY)  # None when the worker cut the body short
        return jsonify(
            body=body.decode(),
            length=len(body),
            path=request.path,
            args=request.args,
            whole=whole == body if whole is not None else None,
        )

    sleeping = [0]  # requests in /slow now

    @app.get("/slow")
    def slow() -> Response:
        sleeping[0] += 1
        try:
            time.sleep(float(request.args.get("seconds", "0.5")))
        finally:
            sleeping[0] -= 1
        return jsonify(may_wait=may_wait())

    @app.get("/environ")
    def environ() -> Response:
        # The WSGI environ the worker built, but for the values that are objects.
        return jsonify({k: v for k, v in request.environ.items() if isinstance(v, str | bool | int)})

    @app.get("/delay-opens")
    def delay_opens() -> Response:
        OPEN_DELAY[0] = float(request.args["seconds"])
        return jsonify(open_delay=OPEN_DELAY[0])

    @app.get("/gc")
    def collector() -> Response:
        # What the worker froze before serving (server/heap.py), and a full pass's count now.
        return jsonify(frozen=gc.get_freeze_count(), collected=gc.collect())

    @app.get("/sleeping")
    def sleeping_now() -> Response:
        return jsonify(sleeping=sleeping[0])

    commits = [0]  # commits run for /commit

    def commit() -> None:
        commits[0] += 1

    @app.post("/commit")
    def commit_route() -> Response:
        # Holding the loop first, until the file ?hold_until names exists (at most 10 s): the
        # requests sent meanwhile are read together, after it.
        hold_until = request.args.get("hold_until")
        deadline = time.monotonic() + 10
        while hold_until and not os.path.exists(hold_until) and time.monotonic() < deadline:
            time.sleep(0.005)
        waited = group_commit.wait_for_commit(commit)
        return jsonify(waited=waited, commits=commits[0])

    def wants_thread(environ: dict[str, Any]) -> bool:
        return bool(environ["PATH_INFO"] == "/slow" or "thread" in environ["QUERY_STRING"])

    app.extensions["wants_thread"] = wants_thread
    return app


# Seconds each connection accepted from now on waits before it is opened (set by /delay-opens).
OPEN_DELAY = [0.0]


def _worker_class(idle_grace: float) -> type[LoopWorker]:
    """The worker, with its ``idle_grace``; after ``/delay-opens?seconds=N``, each connection it
    accepts waits N s before it is opened, having said so in the log ("accepted, not open yet"):
    a test can then signal the worker while a connection is accepted but not open."""

    class Worker(LoopWorker):
        async def _open(self, sock: Any, server: tuple[str, str]) -> None:
            if OPEN_DELAY[0]:
                self.log.warning("accepted, not open yet")
                await asyncio.sleep(OPEN_DELAY[0])
            await super()._open(sock, server)

    Worker.idle_grace = idle_grace
    return Worker


def main() -> None:
    from bench.servers import listen
    from server import wsgi

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-file")
    parser.add_argument("--keepalive", type=int, default=5)
    parser.add_argument("--idle-grace", type=float, default=IDLE_GRACE_SECONDS)
    args = parser.parse_args()
    listener = listen("127.0.0.1", args.port, args.port_file)
    wsgi.run(
        create_app,
        listener=listener,
        workers=1,
        threads=2,
        keepalive=args.keepalive,
        graceful_timeout=10,
        worker_class=_worker_class(args.idle_grace),
    )


if __name__ == "__main__":
    main()
