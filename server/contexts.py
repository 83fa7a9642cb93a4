"""The objects behind Flask's context proxies, for code that runs on every event.

``flask.request``, ``g`` and ``current_app`` are werkzeug ``LocalProxy`` objects. An attribute
of the proxied object is looked up on the proxy first, where it is missing: Python builds an
``AttributeError`` (its message formatted), drops it, and only then calls the proxy's
``__getattr__``, which finds the object in its context variable and looks the name up there. That
costs about 0.8 us a lookup, seven times the lookup itself, and the accept path made twenty of
them per event: 12 % of an event's instructions (callgrind, docs/benchmarks.md).

Each accessor here is the proxy's own ``_get_current_object`` (werkzeug's documented way to get
the object behind a proxy), taken once: calling it returns the request, the ``g`` namespace or the
app of the current context, and raises the same ``RuntimeError`` as the proxy outside one. Code
off the hot path keeps using the proxies, as Flask's documentation does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from flask import Flask, Request, current_app, g, request
from flask.ctx import _AppCtxGlobals

current_request = cast(Callable[[], Request], cast(Any, request)._get_current_object)
current_flask_app = cast(Callable[[], Flask], cast(Any, current_app)._get_current_object)
current_g = cast(Callable[[], _AppCtxGlobals], cast(Any, g)._get_current_object)
