"""Enrichment: what only the server knows or may decide, added to a valid event. Pure functions."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .attribution import with_external_clickid
from .config import CampaignConfig
from .fields import ATTRIBUTION_FIELDS, MAX_USER_AGENT, SERVER_ONLY_FIELDS, TIMEZONES
from .validation import Event


def conversion_date(received_at: float, timezone: str) -> str:
    """``YYYY-MM-DD HH:MM:SS`` of ``received_at`` (a Unix time) in one of Pingtree's fixed-offset zones.

    The zones are fixed offsets (EST is always UTC-5), so no tz database and no daylight saving.
    """
    # time.gmtime + strftime: a third of datetime's cost, on every accepted event.
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(received_at + TIMEZONES[timezone] * 3600))


def forward_body(
    campaign: CampaignConfig,
    event: Event,
    *,
    received_at: float,
    ip_address: str | None,
    user_agent: str | None,
) -> dict[str, Any]:
    """The JSON body sent to ``POST {upstream}/api/event/{cid}``, in Pingtree's seed field names.

    ``conversion_date`` is the moment the relay received the event, fixed here once: a delivery
    hours later (after an outage) still reports the original moment. ``external_clickid`` is filled
    from the campaign's ``external_clickid_from`` here, on the server, so that events of server-side
    callers get it too and the list lives in one place (server/fields.py).
    """
    body: dict[str, Any] = {"transaction_id": event.transaction_id, "event_id": event.event_id}
    if "pid" in event.fields:
        body["pid"] = event.fields["pid"]
    if event.amount is not None:
        body["amount"] = float(event.amount)
    body["conversion_date"] = conversion_date(received_at, campaign.conversion_timezone)
    body["conversion_timezone"] = campaign.conversion_timezone
    for name, value in with_external_clickid(event.fields, campaign.external_clickid_from).items():
        if name != "pid":
            body[name] = value
    body.update(campaign.server_fields)  # the server's values win over anything the browser sent
    if ip_address:
        body["ip_address"] = ip_address
    if user_agent:
        body["user_agent"] = user_agent[:MAX_USER_AGENT]
    return body


def relay_fields(
    campaign: CampaignConfig, sent: Mapping[str, Any], event: Event, forwarded: Mapping[str, Any]
) -> dict[str, str]:
    """Which server-decided fields of ``forwarded`` the relay ``set`` (the caller gave none) or
    ``replaced`` (the caller's value is not the one forwarded): told to trusted callers, who may
    send such fields and must not be left to guess which of theirs reached Pingtree."""
    decided = SERVER_ONLY_FIELDS | frozenset(campaign.server_fields)
    changes: dict[str, str] = {}
    for name in sorted(decided & forwarded.keys()):
        if name in event.fields:  # the caller's value, as validated
            if event.fields[name] != forwarded[name]:
                changes[name] = "replaced"
        else:
            changes[name] = "replaced" if name in sent else "set"
    return changes


def dedupe_key(event: Event) -> str | None:
    """Events that may fire once per lead share a key; Multi-Trigger events (isDuplicate) have none."""
    if event.event.allow_duplicates:
        return None
    return f"{event.cid}|{event.transaction_id}|{event.event_id}"


__all__ = ["ATTRIBUTION_FIELDS", "conversion_date", "dedupe_key", "forward_body", "relay_fields"]
