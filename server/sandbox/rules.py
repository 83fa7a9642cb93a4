"""The pure core of the sandbox: parse a body and check it against Pingtree's documented rules.

No Flask, no clock, no shared state: :func:`check_event` takes the campaigns and a parsed body and
either raises :class:`~server.errors.ApiError` (with Pingtree's exact message) or returns an
:class:`Accepted` event that has "reached event processing". The stateful rules that come after it
(the 2-second lock, then deduplication) live in :mod:`server.sandbox.state`.

Order of the checks (Pingtree documents the messages, not their order; this order reports the most
basic problem first): cid, event_id, transaction_id, event configured, pid active, field formats,
revenue of conversion events.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server.config import CampaignConfig, EventConfig
from server.errors import ApiError
from server.fields import CONVERSION_DATE_PATTERN, COST_FIELDS, COST_OPERATIONS, TIMEZONES

INVALID_JSON = "Invalid JSON body"
CID_REQUIRED = "cid is required"
INVALID_CID = "Invalid cid"
EVENT_ID_REQUIRED = "event_id is required"
TRANSACTION_ID_REQUIRED = "transaction_id is required"
INVALID_EVENT = "Invalid event_id for this campaign"
SOURCE_INACTIVE = "Source Inactive"
REVENUE_REQUIRED = "revenue is required for conversion events"
INVALID_REVENUE = "Invalid revenue"
CONCURRENT = "Concurrent event in progress"
DUPLICATE = "Duplicate event for this transaction_id"
SUCCESS = "Event triggered successfully"
LEAD_NOT_FOUND = "Lead Not Found"  # the global form's own error; its status is undocumented: 404 here

# Pingtree parses sendBeacon-style text/plain JSON too; form posts are not JSON and are refused.
_JSON_MIMETYPES = frozenset({"", "application/json", "text/plain"})
_DATE_RE = re.compile(CONVERSION_DATE_PATTERN)


@dataclass(frozen=True)
class Accepted:
    """A request that passed every stateless rule: it now reaches event processing."""

    cid: str
    event: EventConfig
    transaction_id: str
    pid: str
    revenue: float | None


def parse_body(raw: bytes, mimetype: str) -> dict[str, Any]:
    """The JSON object in ``raw``; ``ApiError(400, "Invalid JSON body")`` for anything else."""
    if mimetype not in _JSON_MIMETYPES and not mimetype.endswith("+json"):
        raise ApiError(400, INVALID_JSON)
    try:
        # NaN/Infinity are not JSON; Python would accept them by default.
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, INVALID_JSON) from None
    if not isinstance(body, dict):
        raise ApiError(400, INVALID_JSON)
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_event(
    campaigns: Mapping[str, CampaignConfig], body: Mapping[str, Any], *, path_cid: str | None
) -> Accepted:
    """Apply the stateless rules. ``path_cid`` is None for ``/api/event/trigger`` (cid in the body)."""
    campaign = _campaign(campaigns, body, path_cid)
    event_id = _required(body, "event_id", EVENT_ID_REQUIRED)
    transaction_id = _required(body, "transaction_id", TRANSACTION_ID_REQUIRED)
    if not isinstance(transaction_id, str):
        raise ApiError(400, "Invalid transaction_id", invalid={"transaction_id": "must be a string"})
    event = campaign.events.get(event_id) if isinstance(event_id, str) else None
    if event is None:
        raise ApiError(400, INVALID_EVENT, invalid={"event_id": INVALID_EVENT})
    pid = _pid(campaign, body.get("pid"))
    _check_fields(body)
    revenue = _revenue(body, _revenue_field(body, path_cid)) if event.conversion else None
    return Accepted(cid=campaign.cid, event=event, transaction_id=transaction_id, pid=pid, revenue=revenue)


def check_global_event(
    campaigns: Mapping[str, CampaignConfig],
    body: Mapping[str, Any],
    *,
    find_lead: Callable[[str], str | None],
) -> Accepted:
    """``POST /api/event/global/{org-id}``: the campaign is the one of the lead ``transaction_id`` names
    (``find_lead``); then the campaign form's rules apply, revenue as ``amount`` (or ``revenue``)."""
    _required(body, "event_id", EVENT_ID_REQUIRED)
    transaction_id = _required(body, "transaction_id", TRANSACTION_ID_REQUIRED)
    if not isinstance(transaction_id, str):
        raise ApiError(400, "Invalid transaction_id", invalid={"transaction_id": "must be a string"})
    cid = find_lead(transaction_id)
    if cid is None:
        raise ApiError(404, LEAD_NOT_FOUND)
    if not _present(body.get("amount")) and _present(body.get("revenue")):
        body = {**body, "amount": body["revenue"]}
    return check_event(campaigns, body, path_cid=cid)


def _present(value: Any) -> bool:
    # Pingtree's JS treats null and "" like an absent field.
    return value is not None and value != ""


def _required(body: Mapping[str, Any], name: str, message: str) -> Any:
    value = body.get(name)
    if not _present(value):
        raise ApiError(400, message, missing={name: message})
    return value


def _campaign(
    campaigns: Mapping[str, CampaignConfig], body: Mapping[str, Any], path_cid: str | None
) -> CampaignConfig:
    cid = path_cid if path_cid is not None else _required(body, "cid", CID_REQUIRED)
    campaign = campaigns.get(cid) if isinstance(cid, str) else None
    if campaign is None:
        raise ApiError(400, INVALID_CID, invalid={"cid": INVALID_CID})
    return campaign


def _pid(campaign: CampaignConfig, pid: Any) -> str:
    if not _present(pid):
        return "organic"  # documented default
    if not isinstance(pid, str):
        raise ApiError(400, "Invalid pid", invalid={"pid": "must be a string"})
    if pid in campaign.inactive_sources:
        raise ApiError(403, SOURCE_INACTIVE)
    return pid


def _check_fields(body: Mapping[str, Any]) -> None:
    """Formats Pingtree documents for optional fields; every bad field is listed at once."""
    invalid: dict[str, str] = {}
    if "conversion_date" in body and not _valid_date(body["conversion_date"]):
        invalid["conversion_date"] = "conversion_date should be 'YYYY-MM-DD' or 'YYYY-MM-DD HH:MM:SS'"
    if "conversion_timezone" in body and body["conversion_timezone"] not in TIMEZONES:
        invalid["conversion_timezone"] = "conversion_timezone should be one of " + ", ".join(TIMEZONES)
    if "cost_operation" in body and body["cost_operation"] not in COST_OPERATIONS:
        invalid["cost_operation"] = "cost_operation should be one of " + ", ".join(COST_OPERATIONS)
    for name in COST_FIELDS:
        if name in body and _number(body[name]) is None:
            invalid[name] = f"{name} should be a number"
    if invalid:
        raise ApiError(400, "Invalid " + ", ".join(invalid), invalid=invalid)


def _valid_date(value: Any) -> bool:
    # The regex pins the documented shape (fromisoformat alone takes "20240105" and more); then a
    # real date and time of day, in ASCII digits and without the newline the regex's $ lets through
    # (fromisoformat: strptime's check, 40 times cheaper).
    if not isinstance(value, str) or not _DATE_RE.match(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _number(value: Any) -> float | None:
    """A finite number, or a numeric string (Pingtree is lenient here); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _revenue_field(body: Mapping[str, Any], path_cid: str | None) -> str:
    """The two documented forms name revenue differently; trigger also accepts ``amount``."""
    if path_cid is not None:
        return "amount"
    if not _present(body.get("revenue")) and _present(body.get("amount")):
        return "amount"
    return "revenue"


def _revenue(body: Mapping[str, Any], field: str) -> float:
    value = body.get(field)
    if not _present(value):
        raise ApiError(400, REVENUE_REQUIRED, missing={field: REVENUE_REQUIRED})
    number = _number(value)
    if number is None or number < 0:
        raise ApiError(400, INVALID_REVENUE, invalid={field: "should be a non-negative number"})
    return number
