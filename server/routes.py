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

from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask.ctx import RequestContext
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule


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
