"""The naive proxy: what the relay is compared with when the upstream is fast.

A Flask endpoint that parses the JSON, makes one ``httpx.post`` to the upstream and passes the
answer back: no checks, no enrichment, nothing stored, nothing retried. Served with the same
gunicorn settings as ``pingtree-relay serve`` (:func:`bench.servers.serve_defaults`), so
relay / naive proxy is what durability and the rules cost against a proxy that keeps nothing.
"""

from __future__ import annotations

import argparse
import json

import httpx
from flask import Flask, Response, request


def create_proxy_app(upstream: str) -> Flask:
    """``POST /api/event/<cid>`` -> one post to ``{upstream}/api/event/<cid>``; ``GET /healthz``."""
    app = Flask("bench_naive_proxy")
    client = httpx.Client(timeout=10)  # one pooled client per worker, shared by its threads

    @app.post("/api/event/<cid>")
    def event(cid: str) -> Response:
        body = json.loads(request.get_data())
        answer = client.post(f"{upstream}/api/event/{cid}", json=body)
        return Response(answer.content, answer.status_code, content_type="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    return app


def main() -> None:
    from server import wsgi

    from .servers import listen, serve_defaults

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-file", help="once listening, write the port here (with --port 0)")
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    upstream = args.upstream.rstrip("/")
    listener = listen(args.host, args.port, args.port_file)
    wsgi.run(lambda: create_proxy_app(upstream), listener=listener, **serve_defaults())


if __name__ == "__main__":
    main()
