"""``GET|POST /postback/{cid}/{source}``: conversions reported by servers (call tracking, buyers).

A thin adapter, like :mod:`server.api`: it reads the parameters (query string, JSON or form body),
checks the source's token, asks :mod:`.mapping` for the event body, then takes the browser's path
unchanged: :func:`~server.validation.validate_event`, enrichment, the durable store, delivery,
deduplication and Pingtree-shaped answers. The caller is a server: no Origin is needed (the token
is the credential) and no visitor IP or user agent is added.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import unquote_to_bytes

from flask import Blueprint, Response, jsonify, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from ..api import read_body
from ..config import CampaignConfig, PostbackConfig
from ..errors import ApiError
from ..relay import Relay, current_relay
from ..request_state import request_state
from ..upstream import with_global_route
from ..validation import parse_json_body, validate_event
from .mapping import TOKEN_PARAM, map_postback

bp = Blueprint("postbacks", __name__)

TOKEN_HEADER = "X-Postback-Token"
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@bp.route("/postback/<cid>/<source>", methods=["GET", "POST"], provide_automatic_options=False)
def postback(cid: str, source: str) -> Response:
    """One postback; every refusal is reported with its reason (metrics, dashboard) and re-raised."""
    rel = current_relay()
    rel.received(cid)
    state = request_state()
    try:
        return _accept(rel, cid, source)
    except (ApiError, HTTPException) as exc:
        status = exc.status if isinstance(exc, ApiError) else (exc.code or 500)
        reason = exc.reason if isinstance(exc, ApiError) else {413: "body_too_large"}.get(status, str(status))
        rel.observers.emit(
            "postback",
            cid=state.cid,
            source=state.postback_source,
            event_id=state.event_id,
            outcome="refused",
            reason=reason,
            status=status,
        )
        raise


def _accept(rel: Relay, cid: str, source_name: str) -> Response:
    if request.method == "HEAD":  # a link checker must not fire a conversion
        raise ApiError(405, "Use GET or POST", headers={"Allow": "GET, POST"}, reason="method")
    campaign = rel.campaign(cid)
    request_state().cid = campaign.cid
    source = campaign.postbacks.get(source_name)
    if source is None:
        raise ApiError(404, "Postback source not found", reason="unknown_source")
    request_state().postback_source = source.name
    _check_token(source, request.headers.get(TOKEN_HEADER) or request.args.get(TOKEN_PARAM))
    mapped = map_postback(campaign, source, _params())
    request_state().event_id = mapped.body["event_id"] if isinstance(mapped.body["event_id"], str) else None
    event = validate_event(campaign, mapped.body, revenue_key="amount", trusted=False)
    if source.global_org_id:
        event = with_global_route(event, source.global_org_id)
    reply = rel.accept(
        campaign, event, idempotency_key=mapped.idempotency_key, ip_address=None, user_agent=None
    )
    request_state().outcome = reply.outcome
    fields = {
        "cid": campaign.cid,
        "event_id": event.event_id,
        "outcome": reply.outcome,
        "status": reply.status,
    }
    rel.observers.emit("postback", **fields, source=source.name, reason="")
    response = jsonify(reply.body)
    response.status_code = reply.status
    response.headers["Cache-Control"] = "no-store"  # a GET that fires a conversion must not be cached
    return response


def _check_token(source: PostbackConfig, sent: str | None) -> None:
    """The token is the postback URL's only credential: compared in constant time, never logged."""
    if not sent:
        raise ApiError(401, "Postback token required (?token= or X-Postback-Token)", reason="token_missing")
    if not hmac.compare_digest(sent.encode(), source.token.encode()):
        raise ApiError(403, "Invalid postback token", reason="token_invalid")


def _params() -> dict[str, Any]:
    """Query string and body as one flat mapping. A name given twice (in the query, or in both the
    query and the body) is refused rather than guessed at."""
    _check_utf8(request.query_string, "query string")
    params = _single(request.args, "query string")
    if request.method == "POST":
        for name, value in _body_params().items():
            if name in params and params[name] != value:
                raise _given_twice(name)
            params[name] = value
    return params


def _body_params() -> dict[str, Any]:
    raw = read_body()
    mime = (request.mimetype or "").lower()
    if mime in _FORM_TYPES:
        if mime == "application/x-www-form-urlencoded":
            _check_utf8(raw, "body")
        return _single(request.form, "body")
    if not raw.strip():
        return {}  # a POST with everything in the query string
    body = parse_json_body(raw, request.content_type)
    nested = sorted(k for k, v in body.items() if isinstance(v, (dict, list)))
    if nested:
        raise ApiError(
            400,
            "Invalid parameters: " + ", ".join(nested[:5]),
            invalid={k[:64]: "expected a string or a number" for k in nested[:5]},
            reason="invalid_parameter",
        )
    return body


def _single(values: MultiDict[str, str], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name in values:
        if len(values.getlist(name)) > 1:
            raise _given_twice(name)
        flat[name] = values[name]
    return flat


def _check_utf8(encoded: bytes, where: str) -> None:
    """400 for the first parameter of a query string or form body whose %-escapes are not UTF-8.
    Werkzeug leaves those escaped: "tid=%ff%fe" would reach Pingtree as a transaction id "%FF%FE"
    that nobody has. Refused, as a JSON body that is not UTF-8 is."""
    for pair in encoded.split(b"&"):
        name, _, value = pair.partition(b"=")
        try:
            for part in (name, value):
                unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            shown = unquote_to_bytes(name).decode("utf-8", "replace")[:64]
            raise ApiError(
                400,
                f"Invalid {where}: {shown} is not UTF-8 text",
                invalid={shown: "not UTF-8 text"},
                reason="invalid_encoding",
            ) from None


def _given_twice(name: str) -> ApiError:
    return ApiError(
        400,
        f"Parameter {name[:64]} given more than once",
        invalid={name[:64]: "given more than once"},
        reason="repeated_parameter",
    )


def source_url(base: str, campaign: CampaignConfig, source: PostbackConfig) -> str:
    """The URL to paste in the platform, with placeholders for the token and for each macro."""
    names = [*source.params, source.event_param, source.duration_param, source.call_id_param]
    query = "".join(f"&{name}=MACRO" for name in dict.fromkeys(n for n in names if n))
    return f"{base}/postback/{campaign.cid}/{source.name}?token=YOUR_TOKEN{query}"
