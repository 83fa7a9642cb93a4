"""The Pingtree-compatible event endpoint: ``POST /api/event/{cid}`` and ``POST /api/event/trigger``.

A thin adapter: it reads the request, asks the pure core (validation, enrichment) and the relay
(store, delivery) and turns the outcome into a Pingtree-shaped answer with CORS headers.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from .config import CampaignConfig
from .errors import ApiError
from .origins import origin_allowed
from .relay import Relay
from .validation import _UUID_RE, parse_json_body, validate_event

bp = Blueprint("events", __name__)
log = logging.getLogger("pingtree_relay.events")

PREFLIGHT_MAX_AGE = "600"


def relay() -> Relay:
    return current_app.extensions["relay"]  # type: ignore[no-any-return]


@bp.post("/api/event/trigger", provide_automatic_options=False)
def trigger() -> Response:
    """Pingtree's second form: ``cid`` in the body, revenue as ``revenue``."""
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    cid = body.get("cid")
    relay().observers.emit("received", cid=cid if isinstance(cid, str) and cid in relay().config.campaigns else None)
    if cid is None or cid == "":
        raise ApiError(400, "cid is required", missing={"cid": "required"}, reason="missing_cid")
    if not isinstance(cid, str):
        raise ApiError(400, "Invalid cid", invalid={"cid": "expected a string"}, reason="invalid_cid")
    campaign = relay().campaign(cid)
    return _handle(campaign, body, revenue_key="revenue")


@bp.post("/api/event/<cid>", provide_automatic_options=False)
def event(cid: str) -> Response:
    """Pingtree's campaign form: ``POST /api/event/{campaign-id}``, revenue as ``amount``."""
    relay().observers.emit("received", cid=cid if cid in relay().config.campaigns else None)
    campaign = relay().campaign(cid)
    trusted = _check_caller(campaign)
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    return _handle(campaign, body, revenue_key="amount", trusted=trusted)


@bp.route("/api/event/<cid>", methods=["OPTIONS"])
def preflight(cid: str) -> Response:
    """CORS preflight; the SDK never needs one (text/plain bodies), other callers might."""
    origin = request.headers.get("Origin")
    campaign = relay().config.campaigns.get(cid)
    if cid == "trigger":
        allowed = any(origin_allowed(origin, c.allowed_origins) for c in relay().config.campaigns.values())
    else:
        allowed = campaign is not None and origin_allowed(origin, campaign.allowed_origins)
    if not allowed:
        raise ApiError(403, "Origin not allowed", reason="origin")
    response = Response(status=204)
    response.headers["Access-Control-Allow-Origin"] = origin or ""
    response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Idempotency-Key"
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    response.headers["Vary"] = "Origin"
    return response


def _check_caller(campaign: CampaignConfig) -> bool:
    """Who may post for this campaign. Returns True for a trusted server-side caller.

    Browsers always send an Origin on POST (fetch and sendBeacon alike): it must be one of the
    campaign's allowed_origins. A request without Origin is a server-side caller and needs the
    campaign's server key; so does any caller that wants to set server-only fields.
    """
    key = request.headers.get("X-Server-Key", "")
    if key and campaign.allow_server_calls and campaign.server_key:
        if hmac.compare_digest(key.encode(), campaign.server_key.encode()):
            return True
        raise ApiError(403, "Invalid server key", reason="server_key")
    origin = request.headers.get("Origin")
    if origin is None:
        if campaign.allow_server_calls:
            raise ApiError(403, "Requests without an Origin need the campaign's server key", reason="server_key")
        raise ApiError(403, "Origin not allowed", reason="origin")
    if not origin_allowed(origin, campaign.allowed_origins):
        raise ApiError(403, "Origin not allowed", reason="origin")
    g.cors_origin = origin
    return False


def _handle(campaign: CampaignConfig, body: dict[str, Any], *, revenue_key: str, trusted: bool | None = None) -> Response:
    g.cid, g.event_id = campaign.cid, body.get("event_id")
    if trusted is None:
        trusted = _check_caller(campaign)
    event = validate_event(campaign, body, revenue_key=revenue_key, trusted=trusted)
    reply = relay().accept(
        campaign, event, idempotency_key=_idempotency_key(),
        ip_address=request.remote_addr, user_agent=request.headers.get("User-Agent"),
    )
    g.outcome = reply.outcome
    relay().observers.emit("accepted", cid=campaign.cid, event_id=event.event_id, outcome=reply.outcome,
                           status=reply.status, event_uuid=reply.body["data"].get("event_uuid"))
    response = jsonify(reply.body)
    response.status_code = reply.status
    return response


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _UUID_RE.match(key):
        raise ApiError(400, "Invalid Idempotency-Key", invalid={"Idempotency-Key": "8-64 letters, digits, '-' or '_'"},
                       reason="invalid_idempotency_key")
    return key


@bp.after_app_request
def cors(response: Response) -> Response:
    """Let an allowed page read the answer (its conversion_id), errors included."""
    origin = getattr(g, "cors_origin", None)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    return response
