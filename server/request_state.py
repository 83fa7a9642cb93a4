"""What the parts handling one request tell each other, as one typed value instead of loose ``g`` names.

The event endpoint's view, the caller check, the rate limiter, the error handlers and the log and
CORS hooks all run for the same request and hand facts along (which campaign, the outcome, which
origin may read the answer). Each fact has one field here, created empty on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contexts import current_g


@dataclass
class RequestState:
    request_id: str | None = None
    started: float | None = None  # time.perf_counter() at the start, for the access log
    cid: str | None = None  # the campaign the request is for, once known
    event_id: str | None = None  # the event's id, when it is a string (it may become a label)
    outcome: str | None = None  # what the accept path did (queued, delivered, filtered...)
    cors_origin: str | None = None  # an origin that may read this answer (Access-Control-Allow-Origin)
    test_traffic: bool = False  # from one of the campaign's staging_origins
    postback_source: str | None = None  # the postback source, on /postback/...


def request_state() -> RequestState:
    """This request's state (created on first use)."""
    namespace = current_g()
    state: RequestState | None = namespace.get("pingtree_request")
    if state is None:
        state = namespace.pingtree_request = RequestState()
    return state
