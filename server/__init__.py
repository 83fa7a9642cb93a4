"""pingtree-relay: a browser SDK generator and a durable relay for Pingtree's Event Postback API."""

from __future__ import annotations

import atexit
import json
import logging
import os
from typing import Any

from flask import Flask, Request, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import MapAdapter

from .config import Config, load_config
from .cpu_load import CpuLoad
from .errors import ApiError, answer
from .headers import add_missing
from .relay import Relay, current_relay
from .request_state import request_state
from .routes import AdapterCache, RelayRequestContext, RouteCache
from .worker import WHOLE_BODY

__all__ = ["create_app", "Config", "load_config"]

log = logging.getLogger("pingtree_relay")


def create_app(
    config: Config | None = None,
    *,
    relay: Relay | None = None,
    start_delivery: bool = True,
    cpu_load: CpuLoad | None = None,
    test_config: dict[str, Any] | None = None,
) -> Flask:
    """The relay's Flask app. ``config`` defaults to the file named by ``PINGTREE_RELAY_CONFIG``.

    ``start_delivery`` runs the delivery engine in this process, from now on (so a backlog left by
    a crash drains without waiting for traffic), and again in a child after a fork: the demo, tests,
    one process that serves and delivers. ``False``: no delivery in this process at all, ever
    (``serve``'s workers: ``pingtree-relay deliver`` delivers beside them); the inline attempt of
    the accept path still happens. ``cpu_load`` (a server's worker passes one): inline attempts only
    while this process has CPU to spare (:mod:`server.cpu_load`).
    """
    if config is None:
        config = load_config(os.environ["PINGTREE_RELAY_CONFIG"])
    app = _RelayFlask(__name__, static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=config.relay.max_body_bytes,
        SECRET_KEY=config.relay.secret_key or os.urandom(32),
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if test_config:
        app.config.update(test_config)
    if config.relay.trusted_proxy_hops:
        # X-Forwarded-For is believed only through this many proxies we run ourselves.
        hops = config.relay.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=0)  # type: ignore[method-assign]

    relay = relay or Relay(config, cpu_load=cpu_load)
    app.extensions["relay"] = relay
    _register(app)
    routes = app.extensions["routes"] = RouteCache(app)  # every rule is in: what each path matches
    app.extensions["wants_thread"] = ThreadHint(relay, routes)  # where server/worker.py runs a request
    if start_delivery:
        relay.start_delivery()
        atexit.register(relay.close)
    return app


class _RelayJSONProvider(DefaultJSONProvider):
    """Flask's JSON, with the encoder of its compact answers (every ``jsonify`` outside debug mode)
    kept: ``json.dumps`` builds a new encoder on every call that passes any argument, and Flask
    passes four. Built again whenever the provider's settings change; other calls go to Flask's."""

    _COMPACT = {"separators": (",", ":")}

    def __init__(self, app: Flask) -> None:
        super().__init__(app)
        self._compact: tuple[tuple[Any, ...], json.JSONEncoder] | None = None

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs != self._COMPACT:
            return super().dumps(obj, **kwargs)
        settings = (self.default, self.ensure_ascii, self.sort_keys)
        if self._compact is None or self._compact[0] != settings:
            encoder = json.JSONEncoder(
                default=self.default, ensure_ascii=self.ensure_ascii, sort_keys=self.sort_keys, **kwargs
            )
            self._compact = (settings, encoder)
        return self._compact[1].encode(obj)


class _RelayFlask(Flask):
    """Flask, with :meth:`ensure_sync`'s answer kept per function: Flask asks it for every hook and
    the view of every request (six times an event), and its ``iscoroutinefunction`` check was 2.5 %
    of the accept path's profiled time in process. Kept for the hooks and views, which are registered once; past
    ``_SYNC_CACHE_LIMIT`` functions (callables made per request) it is worked out each time. Its URL
    adapters are kept too, for requests alike (:class:`server.routes.AdapterCache`)."""

    _SYNC_CACHE_LIMIT = 1024
    json_provider_class = _RelayJSONProvider

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Any, Any] = {}
        self._adapters = AdapterCache()

    def request_context(self, environ: dict[str, Any]) -> RelayRequestContext:
        return RelayRequestContext(self, environ)  # its request matched through the RouteCache

    def create_url_adapter(self, request: Request | None) -> MapAdapter | None:
        # Outside a request, or with TRUSTED_HOSTS (Flask then sets request.trusted_hosts too): Flask's.
        if request is None or self.config["TRUSTED_HOSTS"] is not None:
            return super().create_url_adapter(request)
        return self._adapters.adapter(request, super().create_url_adapter)

    def ensure_sync(self, func: Any) -> Any:
        sync = self._sync.get(func)
        if sync is None:
            sync = super().ensure_sync(func)
            if len(self._sync) < self._SYNC_CACHE_LIMIT:
                self._sync[func] = sync
        return sync


def _register(app: Flask) -> None:
    """Every surface of the relay, in order: blueprints, then the parts wired by ``init_app``."""
    from . import admin, api, health, limits, logs, metrics, openapi, postbacks, sdk

    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(sdk.bp)
    logs.init_app(app)  # request ids and decision lines: first, so every later hook has an id
    limits.init_app(app)
    metrics.init_app(app)
    postbacks.init_app(app)
    admin.init_app(app)
    openapi.init_app(app)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.after_request(_security_headers)


class ThreadHint:
    """The worker's hint (``app.extensions["wants_thread"]``, server/worker.py): whether a request
    may wait on Pingtree, so that it runs on a request thread rather than the worker's loop.

    Only while the relay would try an event inline (:meth:`Relay.would_try_inline`; with every
    slot taken a thread would only wait for the GIL behind the loop), and, for an event endpoint,
    only if the request may carry an event tried inline (:meth:`Relay.may_carry_inline`, the
    campaign read from the app's own routes, the body the worker read whole: ``WHOLE_BODY``). Any
    other request is answered without waiting (202 from the store, on the loop), or is not an
    event: as before.

    What each (path, method) matches comes from the app's :class:`server.routes.RouteCache`, the
    one Flask matches the request through afterwards: werkzeug's match is asked once per path.
    """

    def __init__(self, relay: Relay, routes: RouteCache) -> None:
        self.relay = relay
        self.routes = routes  # the rules, first-party endpoint paths included

    def __call__(self, environ: dict[str, Any]) -> bool:
        relay = self.relay
        if not relay.would_try_inline():
            return False
        found = self.routes.match(environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET"))
        if found is None:  # answered 404 or 405 at once, on whichever thread
            return True
        rule, args = found
        blueprint = str(rule.endpoint).partition(".")[0]
        if blueprint == "postbacks":  # a platform's parameters, not a JSON body: by campaign
            return relay.may_carry_inline(args["cid"], None)
        if blueprint != "events":
            return True
        return relay.may_carry_inline(args.get("cid"), environ.get(WHOLE_BODY))


def _event_request() -> bool:
    """An event endpoint: /api/event/..., a campaign's first-party endpoint_path, or a postback."""
    return request.blueprint in ("events", "postbacks") or request.path.startswith("/api/event")


def _api_error(exc: ApiError) -> Response:
    if _event_request():
        current_relay().rejected(_cid(), _event_id(), reason=exc.reason, status=exc.status)
    response = jsonify(exc.body())
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


def _cid() -> str | None:
    cid = request_state().cid or (request.view_args or {}).get("cid")
    return cid if isinstance(cid, str) and cid in current_relay().config.campaigns else None


def _event_id() -> str | None:
    # Only a configured event id becomes a label: metrics must not grow with garbage input.
    cid, event_id = _cid(), request_state().event_id
    return event_id if cid and event_id in current_relay().config.campaigns[cid].events else None


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    if _event_request() and code >= 400:
        reason = {413: "body_too_large", 405: "method", 404: "not_found"}.get(code, str(code))
        current_relay().rejected(_cid(), None, reason=reason, status=code)
    messages = {
        404: "Not found",
        405: "Method not allowed",
        413: "Request body too large",
        415: "Unsupported content type",
    }
    response = jsonify(answer(code, messages.get(code, exc.name)))
    response.status_code = code
    for key, value in exc.get_headers() if hasattr(exc, "get_headers") else []:
        if key.lower() not in ("content-type", "content-length"):
            response.headers[key] = value
    return response


def _unexpected(exc: Exception) -> Response:
    # Never a stack trace in an answer; the log has it, with the request id.
    log.exception("unexpected error on %s %s", request.method, request.path)
    response = jsonify(answer(500, "Internal error"))
    response.status_code = 500
    return response


_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff"}
_PAGE_SECURITY_HEADERS = {
    **_SECURITY_HEADERS,
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "same-origin",
}


def _security_headers(response: Response) -> Response:
    # What response.mimetype reads, without the property's second lookup of the header.
    page = response.headers.get("Content-Type", "").partition(";")[0].strip() == "text/html"
    add_missing(response.headers, _PAGE_SECURITY_HEADERS if page else _SECURITY_HEADERS)
    return response
