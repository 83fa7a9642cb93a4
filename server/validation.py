"""Validation of an incoming event: plain data in, an :class:`Event` or an :class:`ApiError` out.

No I/O, no Flask globals. The order of checks follows Pingtree's own (event_id, transaction_id,
the event's existence, the source, then fields and revenue) so that the first message a caller
sees is the one Pingtree itself would have given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from .config import CampaignConfig, EventConfig
from .errors import ApiError
from .fields import (
    BROWSER_FIELDS,
    CONTROL_FIELDS,
    CONVERSION_TIME_FIELDS,
    COST_FIELDS,
    COST_OPERATIONS,
    DATE_PATTERN,
    MAX_FIELDS,
    MAX_ID,
    MAX_REVENUE,
    MAX_STRING,
    MAX_USER_AGENT,
    MONEY_PATTERN,
    SERVER_ONLY_FIELDS,
    TIMEZONES,
    UUID_HINT,
    UUID_PATTERN,
)

# Used with fullmatch: re's "$" also matches before a final newline, ECMA-262's (the document's) does not.
_UUID_RE = re.compile(UUID_PATTERN)
_DATE_RE = re.compile(DATE_PATTERN)
_DECIMAL_RE = re.compile(MONEY_PATTERN)
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Event:
    """A valid event, ready for enrichment. ``fields`` holds attribution, lead and consent fields."""

    cid: str
    event: EventConfig
    transaction_id: str
    event_uuid: str | None = None
    amount: Decimal | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def event_id(self) -> str:
        return self.event.name

    def fingerprint(self) -> str:
        """What makes a resent request the same event, for a reused event_uuid: a digest of the
        validated event, not of the raw bytes (key order, or 12 against "12", must not matter) and
        not of what the server adds (the time, the client's IP: a retry may change both)."""
        canonical = _CANONICAL.encode(
            {
                "cid": self.cid,
                "event_id": self.event_id,
                "transaction_id": self.transaction_id,
                "amount": None if self.amount is None else str(self.amount.quantize(CENT)),
                "fields": dict(self.fields),
            }
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


# The fingerprint's JSON: keys sorted, compact, anything else as str. One encoder for every event
# (json.dumps builds one per call for any argument but the defaults).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """Decode a request body. JSON as ``application/json`` or ``text/plain`` (sendBeacon) only."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime not in ("", "application/json", "text/plain"):
        raise ApiError(
            415,
            "Unsupported content type; send JSON as application/json or text/plain",
            reason="content_type",
        )
    if not raw.strip():
        raise ApiError(400, "Empty body; send a JSON object", reason="invalid_json")
    try:
        text = raw.decode("utf-8")
        # Decimals keep "45.10" exact for the two-decimal rule; NaN/Infinity are not JSON numbers.
        body = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError, InvalidOperation):
        # InvalidOperation: a number whose exponent Decimal cannot hold (1e-99999999999999999999)
        raise ApiError(400, "Invalid JSON body", reason="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid JSON body: expected an object", reason="invalid_json")
    return body


# What no field value may hold: a control character but tab, or a lone surrogate (a JSON escape
# can smuggle one in: not text, and no UTF-8 encoder forwards it). One C scan per value.
_UNCLEAN = re.compile("[\x00-\x08\x0a-\x1f\ud800-\udfff]")


def _string(value: Any, limit: int) -> str | None:
    """The value as a clean string, or None when it is not an acceptable string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    if len(text) > limit or _UNCLEAN.search(text):
        return None
    return text


def _required_id(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise ApiError(400, f"{name} is required", missing={name: "required"}, reason=f"missing_{name}")
    text = _string(value, MAX_ID)
    if text is None or not text.strip():
        raise ApiError(
            400,
            f"Invalid {name}",
            invalid={name: f"expected a string of at most {MAX_ID} characters"},
            reason=f"invalid_{name}",
        )
    return text


def parse_amount(value: Any) -> Decimal | str:
    """A revenue as Decimal, or the reason it is not acceptable."""
    if isinstance(value, bool):
        return "expected a number"
    if isinstance(value, str):
        # The pattern holds the bound too: the OpenAPI document states the same rule for strings.
        if not _DECIMAL_RE.fullmatch(value):
            return f"expected a number from 0 to {MAX_REVENUE} with at most 2 decimals"
        value = Decimal(value)
    elif isinstance(value, int):
        value = Decimal(value)
    if not isinstance(value, Decimal):
        return "expected a number"
    if not value.is_finite() or abs(value) > MAX_REVENUE:
        return "expected a finite number"
    if value < 0:
        return "must not be negative"
    if value != value.quantize(CENT):
        return "at most 2 decimals"
    return value


def _check_field(name: str, value: Any) -> Any | None:
    """The clean value of an optional field, or None when invalid (caller reports it)."""
    if name == "tcpa_consent":
        if isinstance(value, bool):
            return int(value)
        return (
            {"0": 0, "1": 1}.get(value)
            if isinstance(value, str)
            else (int(value) if value in (0, 1) else None)
        )
    if name == "tcpa_consent_date":
        return value if isinstance(value, str) and _valid_date(value) else None
    return _string(value, MAX_STRING)


def _valid_date(text: str) -> bool:
    if not _DATE_RE.match(text):
        return False
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True


_FIELD_HINT = {
    "tcpa_consent": "expected 0 or 1",
    "tcpa_consent_date": "expected a date YYYY-MM-DD",
}


def signature_message(cid: str, transaction_id: str, event_id: str, amount: Decimal | float | str) -> bytes:
    """What a signed revenue's HMAC covers: ``cid|transaction_id|event_id|amount`` (amount with 2 decimals)."""
    return f"{cid}|{transaction_id}|{event_id}|{Decimal(str(amount)).quantize(CENT)}".encode()


def sign_revenue(
    secret: str, cid: str, transaction_id: str, event_id: str, amount: Decimal | float | str
) -> str:
    """The token a merchant's backend gives its page for a signed conversion (hex HMAC-SHA256)."""
    msg = signature_message(cid, transaction_id, event_id, amount)
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def validate_event(
    campaign: CampaignConfig,
    body: Mapping[str, Any],
    *,
    revenue_key: str = "amount",
    trusted: bool = False,
) -> Event:
    """Check one event body against its campaign; raise :class:`ApiError` with Pingtree's message.

    ``revenue_key`` is the name the caller's API form uses for revenue (``amount`` on
    ``/api/event/{cid}``, ``revenue`` on ``/api/event/trigger``; both are accepted on both).
    ``trusted`` callers (server-side, with the campaign's server key) may set server-only fields.
    """
    if len(body) > MAX_FIELDS:
        raise ApiError(400, f"Too many fields (at most {MAX_FIELDS})", reason="too_many_fields")
    event_id = _required_id(body, "event_id")
    transaction_id = _required_id(body, "transaction_id")
    event = campaign.events.get(event_id)
    if event is None:
        raise ApiError(
            400,
            "Invalid event_id for this campaign",
            invalid={"event_id": "not configured"},
            reason="invalid_event_id",
        )
    # Normalised the way the forwarded pid is (12345 and "12345" are one source), then checked.
    pid = _string(body.get("pid"), MAX_STRING)
    if pid is not None and pid in campaign.inactive_sources:
        raise ApiError(403, "Source Inactive", reason="source_inactive")

    fields, invalid = _check_fields(campaign, body, trusted=trusted)
    amount = _revenue(campaign, event, body, revenue_key, invalid)
    if invalid:
        raise ApiError(
            400, "Invalid fields: " + ", ".join(sorted(invalid)), invalid=invalid, reason="invalid_fields"
        )
    uuid = _event_uuid(body)
    if event.revenue == "signed":
        _check_signature(campaign, transaction_id, event_id, amount, body.get("signature"))
    return Event(
        cid=campaign.cid,
        event=event,
        transaction_id=transaction_id,
        event_uuid=uuid,
        amount=amount,
        fields=fields,
    )


def _check_fields(
    campaign: CampaignConfig, body: Mapping[str, Any], *, trusted: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    allowed = BROWSER_FIELDS | frozenset(campaign.extra_fields)
    fields: dict[str, Any] = {}
    invalid: dict[str, str] = {}
    for name, value in body.items():
        if name in CONTROL_FIELDS:
            continue
        if name in SERVER_ONLY_FIELDS:
            if trusted:
                fields[name] = value
            else:
                invalid[name] = "set by the server only"
            continue
        if name in campaign.server_fields:
            continue  # the server's value wins; the browser's is dropped
        if name not in allowed:
            if campaign.unknown_fields == "reject":
                invalid[_safe_key(name)] = "unknown field"
            continue
        if value is None:
            continue
        clean = _check_field(name, value)
        if clean is None:
            invalid[name] = _FIELD_HINT.get(name, f"expected a string of at most {MAX_STRING} characters")
        else:
            fields[name] = clean
    if trusted:
        _check_server_only(fields, invalid)
    return fields, invalid


def _check_server_only(fields: dict[str, Any], invalid: dict[str, str]) -> None:
    """A trusted caller may set costs, but still only to sane values."""
    for name in COST_FIELDS:
        if name in fields:
            value = parse_amount(fields[name])
            if isinstance(value, str):
                invalid[name] = value
            else:
                fields[name] = float(value)
    op = fields.get("cost_operation")
    if op is not None and op not in COST_OPERATIONS:
        invalid["cost_operation"] = (
            "expected " + ", ".join(COST_OPERATIONS[:-1]) + " or " + COST_OPERATIONS[-1]
        )
    for name in CONVERSION_TIME_FIELDS:
        fields.pop(name, None)  # always the relay's own: the moment it received the event
    # The visitor's address and browser: the backend has them, the relay (seeing the backend) does not.
    if "ip_address" in fields:
        ip = fields["ip_address"]
        try:
            fields["ip_address"] = str(ipaddress.ip_address(ip.strip())) if isinstance(ip, str) else None
        except ValueError:
            fields["ip_address"] = None
        if fields["ip_address"] is None:
            invalid["ip_address"] = "expected an IPv4 or IPv6 address"
    if "user_agent" in fields:
        ua = fields["user_agent"]
        if not isinstance(ua, str) or _string(ua, MAX_USER_AGENT) is None:  # no control characters either
            invalid["user_agent"] = f"expected a string of at most {MAX_USER_AGENT} characters"


def _safe_key(name: str) -> str:
    return name if len(name) <= 64 else name[:61] + "..."


def _revenue(
    campaign: CampaignConfig,
    event: EventConfig,
    body: Mapping[str, Any],
    revenue_key: str,
    invalid: dict[str, str],
) -> Decimal | None:
    if isinstance(event.revenue, float):
        return Decimal(str(event.revenue)).quantize(CENT)  # fixed by the server; the browser's is ignored
    key = revenue_key if revenue_key in body else ("revenue" if "revenue" in body else "amount")
    raw = body.get(key)
    if raw is None:
        if event.conversion:
            raise ApiError(
                400,
                f"{revenue_key} is required for conversion events",
                missing={revenue_key: "required for conversion events"},
                reason="missing_revenue",
            )
        return None
    value = parse_amount(raw)
    if isinstance(value, str):
        invalid[key] = value
        return None
    if event.max_revenue is not None and value > Decimal(str(event.max_revenue)):
        invalid[key] = f"at most {event.max_revenue:g}"
        return None
    return value


def _event_uuid(body: Mapping[str, Any]) -> str | None:
    value = body.get("event_uuid")
    if value is None or value == "":
        return None
    return checked_uuid(value, "event_uuid", reason="invalid_event_uuid")


def checked_uuid(value: Any, name: str, *, reason: str) -> str:
    """``value`` when it is an acceptable event_uuid or Idempotency-Key (fields.UUID_PATTERN), else
    a 400 that names ``name``."""
    if not isinstance(value, str) or _UUID_RE.fullmatch(value) is None:
        raise ApiError(400, f"Invalid {name}", invalid={name: UUID_HINT}, reason=reason)
    return value


def _check_signature(
    campaign: CampaignConfig, transaction_id: str, event_id: str, amount: Decimal | None, token: Any
) -> None:
    if amount is None or not isinstance(token, str) or not token:
        raise ApiError(403, "Missing revenue signature", reason="signature")
    expected = sign_revenue(campaign.secret, campaign.cid, transaction_id, event_id, amount)
    # A hex token is ASCII; compare_digest raises on non-ASCII text, which must be a 403, not a 500.
    if not token.isascii() or not hmac.compare_digest(expected.encode(), token.lower().encode()):
        raise ApiError(403, "Invalid revenue signature", reason="signature")


def valid_timezone(name: str) -> bool:
    return name in TIMEZONES
