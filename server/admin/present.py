"""Outbox records as the dashboard shows them. Pure functions of plain data, no Flask.

The same row feeds the HTML table and the JSON the feed polls, so the two never disagree.
"""

from __future__ import annotations

import time
from typing import Any

from ..forwarder import answered_status, plain
from ..logs import mask_ip
from ..outbox import Record, State
from ..staging import is_test

DISPLAY_STATES = ("queued", "delivering", "retrying", "delivered", "dead")
# Store states to ask for, per display state (the store filters on its own states only).
STORE_STATE: dict[str, State] = {
    "queued": "pending",
    "delivering": "pending",
    "retrying": "pending",
    "delivered": "delivered",
    "dead": "dead",
}


def upstream_message(record: Record) -> str:
    """Pingtree's message for the last attempt, or the transport error / reason we kept."""
    answer = record.last_answer or {}
    message = answer.get("message") if isinstance(answer, dict) else None
    if isinstance(message, str) and message:
        return str(plain(message))  # as stored: an older release kept lone surrogates
    return record.last_error or ""


def feed_row(record: Record, now: float | None = None) -> dict[str, Any]:
    """One line of the live feed."""
    now = time.time() if now is None else now
    return {
        "id": record.id,
        "received_at": record.received_at,
        "received": clock(record.received_at),
        "received_iso": iso_time(record.received_at),
        "age": age(now - record.received_at),
        "cid": record.cid,
        "event_id": record.event_id,
        "transaction_id": record.transaction_id,
        "state": record.display_state(now),
        "attempts": record.attempts,
        "status": answered_status(record.last_status, record.last_answer),  # what Pingtree meant
        "message": upstream_message(record),
        "latency_ms": round(record.latency_ms) if record.latency_ms is not None else None,
        "test": is_test(record.payload),  # from a staging origin: never sent to Pingtree
    }


def zone(at: float) -> str:
    """The server's zone at ``at`` as an offset: ``UTC`` or ``UTC+02:00`` (names like CST are ambiguous)."""
    offset = time.strftime("%z", time.localtime(at))  # +0200
    return "UTC" if offset in ("+0000", "-0000", "") else f"UTC{offset[:3]}:{offset[3:]}"


def clock(at: float) -> str:
    """``14:03:07 UTC``: a time of day that says which day's clock it is."""
    return f"{time.strftime('%H:%M:%S', time.localtime(at))} {zone(at)}"


def iso_time(at: float) -> str:
    """ISO 8601 with the offset, for the title attribute (the full date on hover)."""
    offset = time.strftime("%z", time.localtime(at))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at)) + f"{offset[:3]}:{offset[3:]}"


def masked_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The forwarded body with the visitor's address cut to its network; everything else as sent."""
    shown = dict(payload)
    if isinstance(shown.get("ip_address"), str):
        shown["ip_address"] = mask_ip(shown["ip_address"])
    return shown


def age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: how long ago, at a glance."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def matches_state(record: Record, wanted: str | None, now: float) -> bool:
    return not wanted or record.display_state(now) == wanted
