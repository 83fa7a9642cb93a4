"""What a request's path and method route to, remembered: werkzeug's matcher runs its state
machine for every request, and on an event's accept path that was about 4 % of the instructions
(measured in process). A box sees few distinct paths, so one lookup per request does.

Both users ask the same :class:`RouteCache`: Flask, through :class:`RelayRequestContext` (the
``match_request`` hook Flask documents for subclasses), and the worker's thread hint
(``server.ThreadHint``), before the app runs. Only what a match depends on is the key: the path,
the method, websocket or not. The host is not, since the relay's URL map matches neither hosts nor
subdomains (checked when the cache is made). The rules do not change while the app serves: Flask
refuses new ones after its first request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Request
from flask.ctx import RequestContext
from werkzeug.exceptions import HTTPException
from werkzeug.routing import MapAdapter, Rule


class RouteCache:
    """``(path, method, websocket) -> (rule, arguments)``, or None when werkzeug answers with an
    exception (404, 405, a redirect): then the caller asks werkzeug itself, which says which, for
    this request's host. Emptied when it holds ``SIZE`` entries, so that a client of random paths
    cannot grow a worker's memory."""

    SIZE = 1024

    def __init__(self, app: Flask) -> None:
        if app.url_map.host_matching or app.subdomain_matching:
            raise ValueError("RouteCache keys on the path alone: no host or subdomain matching")
        self.adapter = app.url_map.bind("relay")
        self.matched: dict[tuple[str, str, bool], tuple[Rule, Mapping[str, Any]] | None] = {}

    def match(self, path: str, method: str, websocket: bool = False) -> tuple[Rule, dict[str, Any]] | None:
        """The rule ``path`` and ``method`` route to and its arguments (a copy: the caller's own)."""
        key = (path, method.upper(), websocket)
        try:
            found = self.matched[key]
        except KeyError:
            if len(self.matched) >= self.SIZE:
                self.matched.clear()
            try:
                found = self.matched[key] = self.adapter.match(
                    path, key[1], return_rule=True, websocket=websocket
                )
            except HTTPException:
                found = self.matched[key] = None
        return None if found is None else (found[0], dict(found[1]))


# What werkzeug's bind_to_environ (and Flask's check of the host before it) read of a request.
_BOUND_BY = (
    "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme", "HTTP_CONNECTION", "HTTP_UPGRADE",
    "SCRIPT_NAME", "REQUEST_METHOD", "PATH_INFO", "QUERY_STRING",
)  # fmt: skip
_KEY_LIMIT = 512  # characters of those values, beyond which a request's adapter is not kept


class AdapterCache:
    """Flask's URL adapter (and the request's host) for requests alike in all that binding reads.

    Flask binds the URL map to every request (``create_url_adapter``): it works out and checks the
    host twice and builds a ``MapAdapter``, about 4 % of a worker's time on the accept path
    (py-spy, docs/benchmarks.md), for the same few values each time (one host, a few paths, no
    query string). An adapter is never changed once made, so requests alike share one. Only what
    binding reads is the key, and only a short key is kept (a client of random hosts or query
    strings gets its adapter made, not kept); emptied at ``SIZE`` entries, as :class:`RouteCache`.
    """

    SIZE = 1024

    def __init__(self) -> None:
        self.bound: dict[tuple[Any, ...], tuple[MapAdapter, str]] = {}

    def adapter(self, request: Request, bind: Callable[[Request], MapAdapter | None]) -> MapAdapter | None:
        """``bind(request)``, or what it gave for a request alike; sets ``request.host`` as it does."""
        environ = request.environ
        key = tuple(environ.get(name) for name in _BOUND_BY)
        try:
            kept, request.host = self.bound[key]
            return kept
        except KeyError:
            pass
        adapter = bind(request)  # raises for a host it refuses: nothing kept
        if adapter is not None and sum(len(v) for v in key if isinstance(v, str)) <= _KEY_LIMIT:
            if len(self.bound) >= self.SIZE:
                self.bound.clear()
            self.bound[key] = (adapter, request.host)
        return adapter


class RelayRequestContext(RequestContext):
    """Flask's request context, its request matched through the app's :class:`RouteCache`."""

    def match_request(self) -> None:
        adapter = self.url_adapter
        routes: RouteCache | None = self.app.extensions.get("routes")
        if adapter is None or routes is None:
            super().match_request()
            return
        found = routes.match(adapter.path_info, adapter.default_method, adapter.websocket)
        if found is None:  # not found, wrong method, or a redirect: werkzeug says which, for this host
            super().match_request()
            return
        self.request.url_rule, self.request.view_args = found
