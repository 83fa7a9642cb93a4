"""The baseline: a Flask endpoint that only parses the JSON body and answers 204.

Served through :func:`server.wsgi.run` with the same settings as ``pingtree-relay serve``
(:func:`bench.servers.serve_defaults`), so relay/baseline isolates what the relay itself costs:
validation, enrichment, the durable write and the inline attempt.
"""

from __future__ import annotations

import argparse
import json

from flask import Flask, Response, request


def create_baseline_app() -> Flask:
    """``POST /api/event/<cid>``: parse the body as JSON, answer 204; ``GET /healthz``: 200."""
    app = Flask("bench_baseline")

    @app.post("/api/event/<cid>")
    def event(cid: str) -> Response:
        body = json.loads(request.get_data(cache=False) or b"null")
        return Response(status=204 if isinstance(body, dict) else 400)

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
    args = parser.parse_args()
    wsgi.run(create_baseline_app, listener=listen(args.host, args.port, args.port_file), **serve_defaults())


if __name__ == "__main__":
    main()
