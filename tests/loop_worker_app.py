"""A small app served by server/worker.py's LoopWorker, for tests/test_worker.py.

``wants_thread`` sends ``/slow`` and any request with ``?thread`` to a request thread; the rest
run on the loop's thread. ``/where`` says where it ran; ``/sleeping``, how many are in ``/slow``;
``/gc``, what the collector has frozen;
``/environ``, the WSGI environ it got.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request

from server.worker import IDLE_GRACE_SECONDS, LoopWorker, may_wait


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
        return jsonify(body=body.decode(), length=len(body), path=request.path, args=request.args)

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

    @app.get("/gc")
    def collector() -> Response:
        # What the worker froze before serving (server/heap.py), and a full pass's count now.
        return jsonify(frozen=gc.get_freeze_count(), collected=gc.collect())

    @app.get("/sleeping")
    def sleeping_now() -> Response:
        return jsonify(sleeping=sleeping[0])

    def wants_thread(environ: dict[str, Any]) -> bool:
        return bool(environ["PATH_INFO"] == "/slow" or "thread" in environ["QUERY_STRING"])

    app.extensions["wants_thread"] = wants_thread
    return app


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
        worker_class=type("LoopWorker", (LoopWorker,), {"idle_grace": args.idle_grace}),
    )


if __name__ == "__main__":
    main()
