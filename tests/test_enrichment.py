"""Enrichment: conversion_date arithmetic for all eight zones, and the forwarded body."""

from __future__ import annotations

import calendar

import pytest

from server.config import TIMEZONES, parse_config
from server.enrichment import conversion_date, dedupe_key, forward_body
from server.validation import validate_event

# 2026-01-01 03:04:05 UTC: early enough in the day that every western zone is on the previous date.
MOMENT = calendar.timegm((2026, 1, 1, 3, 4, 5))


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        ("PST", "2025-12-31 19:04:05"),
        ("EST", "2025-12-31 22:04:05"),
        ("CST", "2025-12-31 21:04:05"),
        ("MST", "2025-12-31 20:04:05"),
        ("AKST", "2025-12-31 18:04:05"),
        ("SST", "2025-12-31 16:04:05"),
        ("HST", "2025-12-31 17:04:05"),
        ("AST", "2025-12-31 23:04:05"),
    ],
)
def test_conversion_date_in_every_zone(zone: str, expected: str) -> None:
    assert conversion_date(MOMENT, zone) == expected


def test_all_zones_covered() -> None:
    assert len(TIMEZONES) == 8


def test_zones_are_fixed_offsets_without_daylight_saving() -> None:
    july = calendar.timegm((2026, 7, 1, 12, 0, 0))
    assert conversion_date(july, "EST") == "2026-07-01 07:00:00"  # EST stays UTC-5 in summer


CONFIG = parse_config(
    {
        "relay": {"upstream_url": "http://127.0.0.1:9"},
        "campaigns": {
            "c1": {
                "conversion_timezone": "PST",
                "server_fields": {"cost": 1.5, "cost_operation": "add", "sub5": "srv"},
                "events": {"sale": {"conversion": True}, "call": {"allow_duplicates": True}},
            }
        },
    }
)


def test_forward_body_field_by_field() -> None:
    campaign = CONFIG.campaigns["c1"]
    event = validate_event(
        campaign,
        {
            "event_id": "sale",
            "transaction_id": "t9",
            "amount": "12.5",
            "pid": "p1",
            "utm_source": "g",
            "sub5": "browser",
        },
    )
    body = forward_body(campaign, event, received_at=MOMENT, ip_address="203.0.113.9", user_agent="UA/1")
    assert body == {
        "transaction_id": "t9",
        "event_id": "sale",
        "pid": "p1",
        "amount": 12.5,
        "conversion_date": "2025-12-31 19:04:05",
        "conversion_timezone": "PST",
        "utm_source": "g",
        "cost": 1.5,
        "cost_operation": "add",
        "sub5": "srv",
        "ip_address": "203.0.113.9",
        "user_agent": "UA/1",
    }


def test_dedupe_key_only_for_single_fire_events() -> None:
    campaign = CONFIG.campaigns["c1"]
    sale = validate_event(campaign, {"event_id": "sale", "transaction_id": "t", "amount": 1})
    call = validate_event(campaign, {"event_id": "call", "transaction_id": "t"})
    assert dedupe_key(sale) == "c1|t|sale"
    assert dedupe_key(call) is None
