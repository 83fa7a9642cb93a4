"""Who is calling the event endpoint: a browser on an allowed page, or the merchant's backend.

Browsers always send an ``Origin`` on POST (fetch and sendBeacon alike); it must be one of the
campaign's ``allowed_origins``. A request without one is a server-side caller: it must carry the
campaign's server key, as ``Authorization: Bearer <key>`` (the usual convention, what HTTP
clients and API gateways set) or ``X-Server-Key: <key>``, and the campaign must allow server calls.
Every refusal says what to send and which config key to set: the caller is usually a developer
copying Pingtree's own curl example, which has no Origin.

A trusted caller also knows the visitor (the relay only sees the backend's socket): it may pass the
visitor's ``ip_address`` and ``user_agent``, and the relay never substitutes its own socket's.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from .config import CampaignConfig
from .errors import ApiError
from .headers import request_header
from .origins import origin_allowed, well_formed_origin
from .request_state import request_state

log = logging.getLogger("pingtree_relay.events")

BEARER = "bearer "


def server_keys(header: Callable[[str], str | None]) -> list[str]:
    """The server keys a request carries: ``X-Server-Key`` and/or an ``Authorization: Bearer`` token.
    ``header(name)``: the request's header, or None (:func:`server.headers.request_header`)."""
    keys = [(header("X-Server-Key") or "").strip()]
    authorization = header("Authorization") or ""
    if authorization[: len(BEARER)].lower() == BEARER:
        keys.append(authorization[len(BEARER) :].strip())
    return [key for key in keys if key]


def check_caller(campaign: CampaignConfig) -> bool:
    """Who may post for this campaign (raises a 403 that says what to do). True for a trusted caller."""
    keys = server_keys(request_header)
    if keys and campaign.allow_server_calls and campaign.server_key:
        # Every key given must be right: a wrong one next to a right one is a misconfigured caller.
        if all(hmac.compare_digest(key.encode(), campaign.server_key.encode()) for key in keys):
            return True
        raise ApiError(403, "Invalid server key", reason="server_key")
    origin = request_header("Origin")
    if origin is None:
        raise ApiError(
            403,
            _no_origin_message(campaign),
            reason="server_key" if campaign.allow_server_calls else "origin",
        )
    if not origin_allowed_for(origin, campaign):
        _refuse_origin(campaign, origin)
    state = request_state()
    state.cors_origin = origin
    # A staging origin is test traffic even when allowed_origins also matches it: never Pingtree.
    state.test_traffic = origin_allowed(origin, campaign.staging_origins)
    return False


def origin_allowed_for(origin: str | None, campaign: CampaignConfig) -> bool:
    """allowed_origins and staging_origins are allowed alike (staging events are test traffic)."""
    return origin_allowed(origin, campaign.allowed_origins) or origin_allowed(
        origin, campaign.staging_origins
    )


def _refuse_origin(campaign: CampaignConfig, origin: str) -> NoReturn:
    """403, readable by the refused page: the answer holds nothing secret, and a page that can read
    it stops (the SDK treats any 4xx but 408/429 as final) where a CORS failure looks like a network
    error to retry forever. Only a well-formed origin is echoed; the log says which one was refused."""
    if well_formed_origin(origin):
        request_state().cors_origin = origin
    log.warning("origin %r refused for campaign %s (not in its allowed_origins)", origin[:120], campaign.cid)
    raise ApiError(403, "Origin not allowed", reason="origin")


def _no_origin_message(campaign: CampaignConfig) -> str:
    where = f"campaigns.{campaign.cid}"
    if campaign.allow_server_calls:
        return (
            f"Requests without an Origin header need the campaign's server key ({where}.server_key in the "
            "relay's config): send it as 'Authorization: Bearer <key>' or 'X-Server-Key: <key>'"
        )
    return (
        f"Origin header missing. Browsers send one, and it must be in {where}.allowed_origins; a server-side "
        f"caller sends 'Authorization: Bearer <key>' instead, which needs {where}.allow_server_calls = true "
        f"and {where}.server_key in the relay's config"
    )


def visitor(
    trusted: bool, fields: Mapping[str, Any], remote_addr: str | None, user_agent: str | None
) -> tuple[str | None, str | None]:
    """The visitor's (ip_address, user_agent) to forward.

    A browser's come from its own request. A trusted caller's request is the backend's, so only
    what it passes in the body is the visitor's; nothing is better than the backend's address.
    """
    if trusted:
        ip, ua = fields.get("ip_address"), fields.get("user_agent")
        return (ip if isinstance(ip, str) else None), (ua if isinstance(ua, str) else None)
    return remote_addr, user_agent
