"""The sandbox's app factory: wires the three surfaces (API, control, page) around one state."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from server.config import Config
from server.errors import ApiError, answer
from server.sandbox import api, control, page
from server.sandbox.state import SandboxState

MAX_BODY_BYTES = 1024 * 1024  # Pingtree bodies are a few KB; this only stops runaway uploads


def create_sandbox_app(config: Config, *, lock_seconds: float = 2.0, max_records: int = 100_000) -> Flask:
    """A Flask app emulating Pingtree's Event Postback API for ``config.campaigns``.

    ``lock_seconds`` is Pingtree's documented 2-second lock per (cid, transaction_id, event_id);
    ``max_records`` bounds the recorded requests and events (the oldest are forgotten first).
    State lives in ``app.extensions["sandbox"]`` (a :class:`SandboxState`).
    """
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.jinja_env.trim_blocks = app.jinja_env.lstrip_blocks = True  # tidy page source
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep Pingtree's field order
    app.extensions["sandbox"] = SandboxState(
        config.campaigns,
        lock_seconds=lock_seconds,
        max_records=max_records,
    )
    app.register_blueprint(api.bp)
    app.register_blueprint(control.bp)
    app.register_blueprint(page.bp)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    # Outside Flask, so that a drop fault can never be turned into an HTTP 500 answer.
    app.wsgi_app = api.DropConnection(app.wsgi_app)  # type: ignore[method-assign]
    return app


def _api_error(exc: ApiError) -> tuple[Response, int]:
    return jsonify(exc.body()), exc.status


def _http_error(exc: HTTPException) -> tuple[Response, int] | Any:
    # 404/405/413/500 keep Pingtree's answer shape, so a client never has to parse HTML.
    status = exc.code or 500
    message = "Internal server error" if status == 500 else (exc.name or "Error")
    return jsonify(answer(status, message)), status
