"""The Pingtree-compatible event endpoint: ``POST /api/event/{cid}`` and ``POST /api/event/trigger``.

A thin adapter: it reads the request, asks the pure core (validation, enrichment) and the relay
(store, delivery) and turns the outcome into a Pingtree-shaped answer with CORS headers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, jsonify, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import RequestEntityTooLarge

from .bots import bot_marker
from .callers import check_caller, origin_allowed_for, visitor
from .config import CampaignConfig
from .contexts import current_flask_app, current_request
from .enrichment import relay_fields
from .errors import ApiError, answer
from .headers import request_header, set_headers
from .relay import current_relay
from .request_state import request_state
from .validation import checked_uuid, parse_json_body, validate_event
from .worker import WHOLE_BODY

bp = Blueprint("events", __name__)
log = logging.getLogger("pingtree_relay.events")

PREFLIGHT_MAX_AGE = "600"


@bp.post("/api/event/trigger", provide_automatic_options=False)
def trigger() -> Response:
    """Pingtree's second form: ``cid`` in the body, revenue as ``revenue``."""
    body = parse_json_body(read_body(), current_request().content_type)
    cid = body.get("cid")
    current_relay().received(cid)
    if cid is None or cid == "":
        raise ApiError(400, "cid is required", missing={"cid": "required"}, reason="missing_cid")
    if not isinstance(cid, str):
        raise ApiError(400, "Invalid cid", invalid={"cid": "expected a string"}, reason="invalid_cid")
    campaign = current_relay().campaign(cid)
    return _handle(campaign, lambda: body, revenue_key="revenue")


@bp.post("/api/event/<cid>", provide_automatic_options=False)
def event(cid: str) -> Response:
    """Pingtree's campaign form: ``POST /api/event/{campaign-id}``, revenue as ``amount``."""
    current_relay().received(cid)
    campaign = current_relay().campaign(cid)
    # The caller is checked before the body is read: a page that may not post gets its 403 first.
    return _handle(
        campaign, lambda: parse_json_body(read_body(), current_request().content_type), revenue_key="amount"
    )


@bp.record
def first_party_routes(state: BlueprintSetupState) -> None:
    """Each campaign's ``sdk.endpoint_path``: the campaign form of the endpoint under a path of its own.

    Ad blockers match well-known names (``/api/event``, ``track``, ``pingtree``); a path the
    merchant picks is unknown to their lists. Real URL rules (added when the blueprint is
    registered, from the app's config) rather than a catch-all: rate limits, 404 and 405 answers
    treat them exactly like ``/api/event/{cid}``. config.py has already refused a path that
    collides with a built-in route or with another campaign's.
    """
    config = state.app.extensions["relay"].config
    for cid, campaign in config.campaigns.items():
        path = campaign.sdk.endpoint_path
        if path:
            state.add_url_rule(
                path,
                f"first_party_{cid}",
                event,
                methods=["POST"],
                defaults={"cid": cid},
                provide_automatic_options=False,
            )
            state.add_url_rule(
                path, f"first_party_preflight_{cid}", preflight, methods=["OPTIONS"], defaults={"cid": cid}
            )


@bp.route("/api/event/<cid>", methods=["OPTIONS"])
def preflight(cid: str) -> Response:
    """CORS preflight; the SDK never needs one (text/plain bodies), other callers might."""
    origin = request.headers.get("Origin")
    campaign = current_relay().config.campaigns.get(cid)
    if cid == "trigger":
        allowed = any(origin_allowed_for(origin, c) for c in current_relay().config.campaigns.values())
    else:
        allowed = campaign is not None and origin_allowed_for(origin, campaign)
    if not allowed:
        raise ApiError(403, "Origin not allowed", reason="origin")
    response = Response(status=204)
    response.headers["Access-Control-Allow-Origin"] = origin or ""
    response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Idempotency-Key"
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    response.headers["Vary"] = "Origin"
    return response


def read_body() -> bytes:
    """The request body, or 413 when it is larger than ``relay.max_body_bytes``.

    Under the relay's own worker the body has been read whole already (``WHOLE_BODY``), and only
    its length is checked: werkzeug's stream around the same bytes cost about a tenth of the event
    view's CPU. Elsewhere (another WSGI server, the test client) werkzeug reads it: it refuses a
    too-long Content-Length itself, but a chunked upload (no Content-Length) is silently cut at the
    limit, where its first bytes could even parse as a complete JSON object. A body that fills the
    limit exactly is therefore probed for one byte more, which raises 413.
    """
    limit = current_flask_app().config.get("MAX_CONTENT_LENGTH")
    req = current_request()
    whole: bytes | None = req.environ.get(WHOLE_BODY)
    if whole is not None:
        if limit is not None and len(whole) > limit:
            raise RequestEntityTooLarge()
        return whole
    data = req.get_data(cache=True)
    if req.content_length is None and limit is not None and len(data) >= limit:
        req.stream.read(1)  # past the limit: werkzeug raises RequestEntityTooLarge
        raise RequestEntityTooLarge()  # the stream had ended exactly at the limit: still too large
    return data


def _handle(
    campaign: CampaignConfig, parse_body: Callable[[], dict[str, Any]], *, revenue_key: str
) -> Response:
    """Admit the caller, then validate, accept and answer one event of ``campaign``."""
    state = request_state()
    state.cid = campaign.cid
    trusted = check_caller(campaign)  # the one place every event request is admitted
    body = parse_body()
    event_id = body.get("event_id")
    # Only a string may become a label: a list here would break whoever reads it later.
    state.event_id = event_id if isinstance(event_id, str) else None
    event = validate_event(campaign, body, revenue_key=revenue_key, trusted=trusted)
    if campaign.bot_filter and not trusted:
        filtered = _filter_bot(campaign, event.event_id)
        if filtered is not None:
            return filtered
    ip_address, user_agent = visitor(
        trusted, event.fields, current_request().remote_addr, request_header("User-Agent")
    )
    reply = current_relay().accept(
        campaign,
        event,
        idempotency_key=_idempotency_key(),
        ip_address=ip_address,
        user_agent=user_agent,
        test=state.test_traffic,
    )
    # Say which server-decided fields are the relay's, not the caller's (from the body it stored).
    if trusted and reply.forwarded is not None:
        reply.body["data"]["relay_fields"] = relay_fields(campaign, body, event, reply.forwarded)
    state.outcome = reply.outcome
    response = jsonify(reply.body)
    response.status_code = reply.status
    return response


def _filter_bot(campaign: CampaignConfig, event_id: str) -> Response | None:
    """A 202 for a known automated client: nothing stored, nothing forwarded, the reason reported.

    Checked after validation, so a robot's malformed event still gets its 4xx like anyone's.
    Trusted server-side callers are never filtered: their User-Agent is a library's by design.
    """
    marker = bot_marker(request_header("User-Agent"))
    if marker is None:
        return None
    request_state().outcome = "filtered"
    current_relay().filtered(campaign.cid, event_id, reason="bot")
    log.info("filtered %s/%s from an automated client (%s)", campaign.cid, event_id, marker)
    response = jsonify(answer(202, "Event accepted; not forwarded (automated client)", type="filtered"))
    response.status_code = 202
    return response


def _idempotency_key() -> str | None:
    key = request_header("Idempotency-Key")
    if key is None:
        return None
    return checked_uuid(key, "Idempotency-Key", reason="invalid_idempotency_key")


@bp.after_app_request
def cors(response: Response) -> Response:
    """Let an allowed page read the answer (its conversion_id), errors included."""
    origin = request_state().cors_origin
    if origin:
        set_headers(
            response.headers,
            {
                "Access-Control-Allow-Origin": origin,
                "Vary": "Origin",
                # A page's SDK reads Retry-After on a 429 to back off instead of hammering.
                "Access-Control-Expose-Headers": "Retry-After",
            },
        )
    return response
