"""The pure validation core: every rule, every message, as tables."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from server.config import parse_config
from server.errors import ApiError
from server.validation import parse_amount, parse_json_body, sign_revenue, validate_event

CONFIG = parse_config(
    {
        "relay": {"upstream_url": "http://127.0.0.1:9"},
        "campaigns": {
            "cmp_v": {
                "inactive_sources": ["src_off", "12345"],
                "extra_fields": ["quote_id"],
                "server_fields": {"cost": 2, "sub5": "srv"},
                "secret": "s3cret",
                "events": {
                    "view": {},
                    "sale": {"conversion": True, "max_revenue": 1000},
                    "fixed": {"conversion": True, "revenue": 25.0},
                    "signed": {"conversion": True, "revenue": "signed"},
                },
            },
            "cmp_drop": {"unknown_fields": "drop", "events": {"view": {}}},
        },
    }
)
CAMPAIGN = CONFIG.campaigns["cmp_v"]
OK = {"event_id": "view", "transaction_id": "t-1"}


def err(body: dict[str, Any], **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate_event(CAMPAIGN, body, **kw)
    return info.value


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"transaction_id": "t"}, 400, "event_id is required"),
        ({"event_id": "", "transaction_id": "t"}, 400, "event_id is required"),
        ({"event_id": "view"}, 400, "transaction_id is required"),
        ({"event_id": "view", "transaction_id": ""}, 400, "transaction_id is required"),
        ({"event_id": "nope", "transaction_id": "t"}, 400, "Invalid event_id for this campaign"),
        ({"event_id": ["view"], "transaction_id": "t"}, 400, "Invalid event_id"),
        ({"event_id": "view", "transaction_id": {"a": 1}}, 400, "Invalid transaction_id"),
        ({"event_id": "view", "transaction_id": "x" * 129}, 400, "Invalid transaction_id"),
        ({**OK, "pid": "src_off"}, 403, "Source Inactive"),
        ({"event_id": "sale", "transaction_id": "t"}, 400, "amount is required for conversion events"),
        ({**OK, "cost": 5}, 400, "Invalid fields: cost"),
        ({**OK, "min_price": 5, "adSpend": 1}, 400, "Invalid fields: adSpend, min_price"),
        ({**OK, "conversion_date": "2024-01-01"}, 400, "Invalid fields: conversion_date"),
        ({**OK, "bogus": "x"}, 400, "Invalid fields: bogus"),
        ({**OK, "utm_source": 5.5}, 400, "Invalid fields: utm_source"),
        ({**OK, "utm_source": "x" * 256}, 400, "Invalid fields: utm_source"),
        ({**OK, "sub1": ["a"]}, 400, "Invalid fields: sub1"),
        ({**OK, "sub1": {"a": {"b": 1}}}, 400, "Invalid fields: sub1"),
        ({**OK, "sub1": True}, 400, "Invalid fields: sub1"),
        ({**OK, "tcpa_consent": 2}, 400, "Invalid fields: tcpa_consent"),
        ({**OK, "tcpa_consent": "yes"}, 400, "Invalid fields: tcpa_consent"),
        ({**OK, "tcpa_consent_date": "2024-02-30"}, 400, "Invalid fields: tcpa_consent_date"),
        ({**OK, "tcpa_consent_date": "01/02/2024"}, 400, "Invalid fields: tcpa_consent_date"),
        ({"event_id": "sale", "transaction_id": "t", "amount": -1}, 400, "Invalid fields: amount"),
        (
            {"event_id": "sale", "transaction_id": "t", "amount": Decimal("1.234")},
            400,
            "Invalid fields: amount",
        ),
        (
            {"event_id": "sale", "transaction_id": "t", "amount": Decimal("1E+309")},
            400,
            "Invalid fields: amount",
        ),
        ({"event_id": "sale", "transaction_id": "t", "amount": "abc"}, 400, "Invalid fields: amount"),
        ({"event_id": "sale", "transaction_id": "t", "amount": True}, 400, "Invalid fields: amount"),
        ({"event_id": "sale", "transaction_id": "t", "amount": 1000.01}, 400, "Invalid fields: amount"),
        ({**OK, "event_uuid": "short"}, 400, "Invalid event_uuid"),
        ({**OK, "event_uuid": "bad uuid with spaces"}, 400, "Invalid event_uuid"),
        ({"event_id": "signed", "transaction_id": "t", "amount": 10}, 403, "Missing revenue signature"),
        (
            {"event_id": "signed", "transaction_id": "t", "amount": 10, "signature": "00" * 32},
            403,
            "Invalid revenue signature",
        ),
        ({**OK, **{f"f{i}": "x" for i in range(70)}}, 400, "Too many fields (at most 64)"),
        # pid as a JSON number is the same source as the string: checked after normalising.
        ({**OK, "pid": 12345}, 403, "Source Inactive"),
        ({**OK, "pid": "12345"}, 403, "Source Inactive"),
        # A signature is hex: non-ASCII text is a wrong signature (it used to raise inside compare_digest).
        (
            {"event_id": "signed", "transaction_id": "t", "amount": 10, "signature": "é" * 64},
            403,
            "Invalid revenue signature",
        ),
        (
            {"event_id": "signed", "transaction_id": "t", "amount": 10, "signature": "\ud800" * 64},
            403,
            "Invalid revenue signature",
        ),
        # Digits of other scripts are not ASCII digits: "١٢" is not 12.
        ({"event_id": "sale", "transaction_id": "t", "amount": "١٢"}, 400, "Invalid fields: amount"),
        ({"event_id": "sale", "transaction_id": "t", "amount": "١٢.٥٠"}, 400, "Invalid fields: amount"),
        ({"event_id": "sale", "transaction_id": "t", "amount": "１２"}, 400, "Invalid fields: amount"),
        ({**OK, "tcpa_consent_date": "٢٠٢٤-٠١-٠٢"}, 400, "Invalid fields: tcpa_consent_date"),
    ],
)
def test_rejections(body: dict[str, Any], status: int, message: str) -> None:
    error = err(body)
    assert (error.status, error.message) == (status, message)


def test_invalid_fields_are_listed() -> None:
    error = err({**OK, "cost": 1, "bogus": 2, "utm_term": []})
    assert error.invalid == {
        "cost": "set by the server only",
        "bogus": "unknown field",
        "utm_term": "expected a string of at most 255 characters",
    }


def test_missing_revenue_names_the_form_field() -> None:
    assert err({"event_id": "sale", "transaction_id": "t"}, revenue_key="revenue").missing == {
        "revenue": "required for conversion events"
    }


def test_valid_event_keeps_attribution_and_drops_server_field_values() -> None:
    body = {
        **OK,
        "pid": "src_1",
        "utm_source": "g",
        "sub5": "browser",
        "quote_id": "q1",
        "tcpa_consent": "1",
        "tcpa_consent_date": "2026-11-26",
        "event_uuid": "abcdef12-3456",
    }
    event = validate_event(CAMPAIGN, body)
    assert event.event_id == "view" and event.transaction_id == "t-1"
    assert event.event_uuid == "abcdef12-3456"
    assert dict(event.fields) == {
        "pid": "src_1",
        "utm_source": "g",
        "quote_id": "q1",
        "tcpa_consent": 1,
        "tcpa_consent_date": "2026-11-26",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (45, Decimal(45)),
        (Decimal("45.10"), Decimal("45.10")),
        ("45.1", Decimal("45.1")),
        (0, Decimal(0)),
    ],
)
def test_amounts(raw: Any, expected: Decimal) -> None:
    assert parse_amount(raw) == expected


def test_revenue_alias_on_both_forms() -> None:
    assert validate_event(CAMPAIGN, {"event_id": "sale", "transaction_id": "t", "revenue": 5}).amount == 5
    assert (
        validate_event(
            CAMPAIGN, {"event_id": "sale", "transaction_id": "t", "amount": 5}, revenue_key="revenue"
        ).amount
        == 5
    )


def test_fixed_revenue_ignores_the_browser() -> None:
    event = validate_event(CAMPAIGN, {"event_id": "fixed", "transaction_id": "t", "amount": 999})
    assert event.amount == Decimal("25.00")


def test_signed_revenue_accepts_a_good_signature() -> None:
    token = sign_revenue("s3cret", "cmp_v", "t", "signed", "10")
    event = validate_event(
        CAMPAIGN, {"event_id": "signed", "transaction_id": "t", "amount": 10, "signature": token}
    )
    assert event.amount == 10
    tampered = {"event_id": "signed", "transaction_id": "t", "amount": 11, "signature": token}
    assert err(tampered).message == "Invalid revenue signature"


def test_trusted_callers_may_set_costs_but_not_dates() -> None:
    event = validate_event(
        CAMPAIGN, {**OK, "min_price": 3, "cost_operation": "override", "conversion_date": "x"}, trusted=True
    )
    assert dict(event.fields) == {"min_price": 3.0, "cost_operation": "override"}


def test_unknown_fields_can_be_dropped() -> None:
    event = validate_event(CONFIG.campaigns["cmp_drop"], {**OK, "bogus": 1})
    assert dict(event.fields) == {}


@pytest.mark.parametrize(
    ("raw", "ctype", "status", "message"),
    [
        (b"", "application/json", 400, "Empty body; send a JSON object"),
        (b"{", "application/json", 400, "Invalid JSON body"),
        (b"[1]", "text/plain", 400, "Invalid JSON body: expected an object"),
        (b'{"a": NaN}', "application/json", 400, "Invalid JSON body"),
        (b'{"a": Infinity}', "application/json", 400, "Invalid JSON body"),
        (b"\xff\xfe{}", "application/json", 400, "Invalid JSON body"),
        (
            b"a=1",
            "application/x-www-form-urlencoded",
            415,
            "Unsupported content type; send JSON as application/json or text/plain",
        ),
        (b"[" * 100000, "application/json", 400, "Invalid JSON body"),
    ],
)
def test_bodies(raw: bytes, ctype: str, status: int, message: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_json_body(raw, ctype)
    assert (info.value.status, info.value.message) == (status, message)


def test_text_plain_json_is_accepted() -> None:
    body = parse_json_body(json.dumps({"a": 1.5}).encode(), "text/plain;charset=UTF-8")
    assert body == {"a": Decimal("1.5")}


def test_the_fingerprint_is_the_event_not_its_spelling() -> None:
    sale = {"event_id": "sale", "transaction_id": "t", "amount": 20, "sub1": "x"}
    same = validate_event(
        CAMPAIGN,
        {
            "sub1": "x",
            "amount": "20.00",
            "transaction_id": "t",
            "event_id": "sale",
            "event_uuid": "another-uuid-1",
        },
    )
    assert validate_event(CAMPAIGN, sale).fingerprint() == same.fingerprint()
    for change in ({"amount": 21}, {"sub1": "y"}, {"transaction_id": "u"}, {"event_id": "view"}):
        assert validate_event(CAMPAIGN, {**sale, **change}).fingerprint() != same.fingerprint(), change
