"""Postback parameters -> a Pingtree event body. Pure: plain data in, a :class:`Postback` or an
:class:`~server.errors.ApiError` out; no Flask, no clock.

What a call-tracking platform or a buyer sends is a flat set of parameters named the platform's
way (``tid``, ``payout``, ``duration``). The source's mapping renames them to Pingtree's names, a
few are consumed here (the event name, the call length, the platform's call id, the token), and the
result goes through the same :func:`~server.validation.validate_event` as a browser's event.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, NoReturn

from ..config import CampaignConfig, PostbackConfig
from ..errors import ApiError
from ..fields import BROWSER_FIELDS

TOKEN_PARAM = "token"
# Set by the source's configuration (or the relay), never by a parameter.
RESERVED = frozenset({"cid", "event_id", "event_uuid", "signature"})
# A macro the platform left as typed (``[tag:transaction_id]``, ``{{call_id}}``, ``%payout%``): the
# platform did not know the value. Forwarding the macro's text as a transaction id would attach the
# call to no lead at all, silently; refusing it names the parameter to fix.
_UNFILLED_MACRO = re.compile(r"^(\[[^\]]*\]|\{\{[^}]*\}\}|\{[A-Za-z_:.]+\}|%[A-Za-z_:.]+%)$")
_PLAIN_AMOUNT = re.compile(r"^\d{1,10}(\.\d{1,2})?$")
# "$1,234.50", "1234.5 USD", "€45": a currency symbol or code around digits with thousands commas.
_LENIENT_AMOUNT = re.compile(
    r"^(?:[A-Z]{3}\s*)?[$€£¥]?\s*(?P<int>\d{1,3}(?:,\d{3})+|\d{1,10})(?P<frac>\.\d+)?\s*(?:[A-Z]{3})?$"
)
_DECORATED = re.compile(r"[$€£¥,]|[A-Z]{3}")
_CLOCK = re.compile(r"^(?:(?P<h>\d{1,3}):)?(?P<m>\d{1,2}):(?P<s>\d{2})$")  # "1:30", "00:01:30"
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Postback:
    """A mapped postback: the event body for validation and the key that makes a retry count once."""

    body: dict[str, Any]
    idempotency_key: str


def postback_fields(campaign: CampaignConfig) -> frozenset[str]:
    """The Pingtree names a source's ``params`` may map to (what the campaign accepts from a caller)."""
    return (
        frozenset({"transaction_id", "amount", "revenue"}) | BROWSER_FIELDS | frozenset(campaign.extra_fields)
    )


def map_postback(campaign: CampaignConfig, source: PostbackConfig, params: Mapping[str, Any]) -> Postback:
    """The event body of one postback, or ApiError (400) naming the platform's parameter at fault."""
    present = _present(source, params)
    _check_duration(source, present)
    event_id = source.event or _required_param(present, source.event_param, "event_id", "missing_event_id")
    if not isinstance(event_id, str):  # a JSON body's number, list or object: never an event's name
        raise ApiError(
            400,
            f"Invalid {source.event_param}: expected the event's name",
            invalid={source.event_param: "expected a string"},
            reason="invalid_event_id",
        )
    body, origin = _renamed(source, present)
    body["event_id"] = event_id
    transaction_id = body.get("transaction_id")
    if transaction_id is None:
        names = [p for p, target in source.params.items() if target == "transaction_id"] or ["transaction_id"]
        raise ApiError(
            400,
            f"transaction_id is required: no {' or '.join(names)} parameter in the postback",
            missing={names[0]: "required (the lead's transaction_id)"},
            reason="missing_transaction_id",
        )
    if "amount" in body:
        body["amount"] = _amount(source, origin["amount"], body["amount"])
    call_id = present.get(source.call_id_param, "") if source.call_id_param else ""
    event = campaign.events.get(event_id)
    if event is not None and event.allow_duplicates and call_id == "":
        # Without a call id, a second call has the first one's key: it would be answered as its retry.
        _missing_call_id(source, event_id)
    return Postback(
        body=body,
        idempotency_key=idempotency_key(
            campaign.cid, source.name, str(transaction_id), event_id, str(call_id)
        ),
    )


def _missing_call_id(source: PostbackConfig, event_id: str) -> NoReturn:
    why = f"{event_id} counts every call (allow_duplicates), so each postback must say which call it reports"
    if source.call_id_param:
        raise ApiError(
            400,
            f"{source.call_id_param} is required: {why}",
            missing={source.call_id_param: "required (the call's id)"},
            reason="missing_call_id",
        )
    raise ApiError(
        400,
        f"{why}; this source has no call_id_param (postbacks.{source.name}.call_id_param in the relay's config)",
        reason="missing_call_id",
    )


def idempotency_key(cid: str, source: str, transaction_id: str, event_id: str, call_id: str = "") -> str:
    """Stable across a platform's retries of one postback: the same call reported twice is one event."""
    digest = hashlib.sha256(
        "\x1f".join((cid, source, transaction_id, event_id, call_id)).encode()
    ).hexdigest()
    return "pb_" + digest[:40]


def _present(source: PostbackConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that carry a value: no token, no ignored ones, no empty ones; unfilled macros refused."""
    present: dict[str, Any] = {}
    unfilled: dict[str, str] = {}
    for name, value in params.items():
        if name == TOKEN_PARAM or name in source.ignore_params or value is None or value == "":
            continue
        if isinstance(value, str) and _UNFILLED_MACRO.match(value.strip()):
            unfilled[name] = f"the macro {value[:60]} was not filled in by the platform"
            continue
        present[name] = value
    if unfilled:
        raise ApiError(
            400, "Unfilled macros: " + ", ".join(sorted(unfilled)), invalid=unfilled, reason="unfilled_macro"
        )
    return present


def _required_param(params: Mapping[str, Any], name: str, carries: str, reason: str) -> Any:
    value = params.get(name)
    if value is None:
        raise ApiError(
            400,
            f"{carries} is required: no {name} parameter in the postback",
            missing={name: f"required (the {carries})"},
            reason=reason,
        )
    return value


def _renamed(source: PostbackConfig, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Platform names -> Pingtree names; also which platform parameter each Pingtree field came from."""
    consumed = {source.event_param, source.duration_param, source.call_id_param} - {""}
    body: dict[str, Any] = {}
    origin: dict[str, str] = {}
    invalid: dict[str, str] = {}
    for name, value in params.items():
        if name in consumed:
            continue
        target = source.params.get(name, name)
        target = "amount" if target == "revenue" else target  # one revenue field on the campaign form
        if target in RESERVED:
            invalid[name] = "set by the postback's configuration, not by a parameter"
        elif target in body and body[target] != value:
            invalid[name] = f"conflicts with {origin[target]}: both give {target}"
        else:
            body[target], origin[target] = value, name
    if invalid:
        raise ApiError(
            400,
            "Invalid parameters: " + ", ".join(sorted(invalid)),
            invalid=invalid,
            reason="invalid_parameter",
        )
    return body, origin


def _check_duration(source: PostbackConfig, params: Mapping[str, Any]) -> None:
    """A call shorter than ``min_duration`` is not a conversion (the usual payout rule)."""
    if source.min_duration is None:
        return
    name = source.duration_param
    raw = _required_param(params, name, "call duration", "missing_duration")
    seconds = parse_seconds(raw)
    if seconds is None:
        raise ApiError(
            400,
            f"Invalid {name}: expected the call length in seconds",
            invalid={name: "expected a number of seconds (or M:SS)"},
            reason="invalid_duration",
        )
    if seconds < source.min_duration:
        raise ApiError(
            400,
            f"Call too short to be a conversion: {seconds:g} s, min_duration is {source.min_duration:g} s",
            invalid={name: f"at least {source.min_duration:g} seconds"},
            reason="short_call",
        )


def parse_seconds(raw: Any) -> float | None:
    """``90``, ``"90"``, ``"90.5"``, ``"1:30"`` or ``"00:01:30"`` -> seconds; None when it is none of them."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float, Decimal)):
        try:
            value = float(raw)
        except OverflowError:  # an int of hundreds of digits
            return None
        return value if value >= 0 and value == value and value != float("inf") else None
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    if re.match(r"^\d{1,9}(\.\d+)?$", text):
        return float(text)
    clock = _CLOCK.match(text)
    if clock is None:
        return None
    return int(clock["h"] or 0) * 3600 + int(clock["m"]) * 60 + int(clock["s"])


def _amount(source: PostbackConfig, param: str, raw: Any) -> Any:
    """Amounts as text: plain numbers pass on to validation; currency symbols and commas only when
    the source says how to read them (``amount_format = "lenient"``), since "1,234" could be 1.234."""
    if not isinstance(raw, str) or _PLAIN_AMOUNT.match(raw):
        return raw
    text = raw.strip()
    if not _DECORATED.search(text):
        return raw  # not a formatting question: validation says what is wrong with it
    lenient = _LENIENT_AMOUNT.match(text)
    if source.amount_format == "lenient" and lenient:
        if len(lenient["frac"] or "") > 3:  # "." and two digits: cents are never rounded away
            raise ApiError(
                400,
                f"Invalid {param}: {text[:40]!r} has more than two decimals",
                invalid={param: "at most two decimals"},
                reason="amount_format",
            )
        number = Decimal(lenient["int"].replace(",", "") + (lenient["frac"] or ""))
        return str(number.quantize(CENT, rounding=ROUND_HALF_UP))
    raise ApiError(
        400,
        f"Invalid {param}: {text[:40]!r} has a currency symbol or a thousands separator; "
        'send a plain number like 1234.50, or set amount_format = "lenient"',
        invalid={param: "expected a plain number like 1234.50"},
        reason="amount_format",
    )
