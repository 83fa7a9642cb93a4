"""Rate limits on the event endpoints, with flask-limiter: one bucket per client IP, one per campaign.

Configured by ``[relay.rate_limits]`` (flask-limiter syntax; ``""`` turns a limit off)::

    per_ip = "120/minute"        # every POST to an event endpoint, whatever its outcome
    per_campaign = "60000/minute"  # events of one campaign the relay actually took in

Why the two count different things: ``per_ip`` is against one abusive client, so garbage counts
too. ``per_campaign`` protects the store and Pingtree from a flood of one campaign's events; it is
charged only for events that passed the origin check and validation, because a campaign id is
public and rejected traffic from strangers must not be able to use up a real site's budget.

Storage: in memory by default, which is per worker process (N gunicorn workers let through up to
N times the limit); in Redis when ``relay.store`` is Redis, shared by every worker and node.
Over the limit: 429 in Pingtree's shape with ``Retry-After`` in seconds.
"""

from __future__ import annotations

import json
import math
import time

from flask import Flask, Response, current_app, jsonify, request
from flask_limiter import Limiter, RateLimitExceeded

from . import api
from .callers import origin_allowed_for
from .contexts import current_request
from .errors import answer
from .relay import current_relay, relay_of
from .request_state import request_state

# Keys in a shared Redis must not collide with the outbox's.
KEY_PREFIX = "pingtree-relay-limits"


def init_app(app: Flask) -> None:
    """Attach the limiter to the event endpoints (the ``events`` blueprint) of ``app``."""
    settings = relay_of(app).config.relay
    limits = settings.rate_limits
    if not limits.per_ip and not limits.per_campaign:
        return  # both off: no limiter at all, not one that checks every request for nothing
    store = settings.store
    limiter = Limiter(
        key_func=client_ip,
        storage_uri=store if store.startswith("redis://") else "memory://",
        strategy="fixed-window",
        key_prefix=KEY_PREFIX,
        headers_enabled=False,  # Retry-After goes on the 429 only, never on a success
        swallow_errors=True,  # a Redis hiccup must not cost an event: unlimited beats lost
    )
    if limits.per_ip:
        # Shared: both API forms and every first-party path draw from one bucket per client.
        limiter.shared_limit(limits.per_ip, scope="per_ip", key_func=client_ip, methods=["POST"])(api.bp)
    if limits.per_campaign:
        limiter.shared_limit(
            limits.per_campaign,
            scope="per_campaign",
            key_func=campaign_key,
            methods=["POST"],
            deduct_when=_taken_in,
        )(api.bp)
    limiter.init_app(app)
    app.extensions["pingtree_limiter"] = limiter
    app.register_error_handler(RateLimitExceeded, _too_many_requests)


def client_ip() -> str:
    """The client's address: the socket's, or the one ProxyFix took from trusted X-Forwarded-For hops."""
    return current_request().remote_addr or "unknown"


def campaign_key() -> str:
    """The campaign of this request, from the URL or (``/api/event/trigger``) the body's ``cid``.

    An unknown campaign gives "" and flask-limiter skips the limit: it is answered 404 anyway, and
    made-up ids must not create buckets.
    """
    cid = (current_request().view_args or {}).get("cid")
    if cid is None:  # /api/event/trigger
        cid = _body_cid()
    return cid if isinstance(cid, str) and cid in current_relay().config.campaigns else ""


def _body_cid() -> object:
    # The view's own reader (the worker's whole body, or werkzeug's stream cached): the body is read
    # once, its size checked by one rule.
    try:
        body = json.loads(api.read_body())
    except (ValueError, RecursionError):
        return None
    return body.get("cid") if isinstance(body, dict) else None


def _taken_in(response: Response) -> bool:
    """Charge the campaign only for events the relay stored (see the module docstring)."""
    return request_state().outcome not in (None, "filtered")


def _too_many_requests(exc: RateLimitExceeded) -> Response:
    limiter: Limiter = current_app.extensions["pingtree_limiter"]
    breached = limiter.current_limit
    retry_after = 1
    if breached is not None:
        retry_after = max(1, math.ceil(breached.reset_at - time.time()))
    scope = "campaign" if breached is not None and "per_campaign" in breached.key else "client"
    cid = campaign_key() or None
    current_relay().rejected(cid, None, reason="rate_limited", status=429)
    response = jsonify(answer(429, f"Too many requests for this {scope}; retry after {retry_after} seconds"))
    response.status_code = 429
    response.headers["Retry-After"] = str(retry_after)
    origin = request.headers.get("Origin")
    if cid and origin_allowed_for(origin, current_relay().config.campaigns[cid]):
        request_state().cors_origin = origin  # let the campaign's own page read the 429 and back off
    return response
