"""More than 200 malformed requests, one table: each gets a 4xx with a clear message, none reaches Pingtree.

One relay for the module (default test campaigns) and the session's sandbox; every row checks the
answer's status, its Pingtree shape, the words of its message, and that the sandbox saw nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import Relay, Sandbox, make_relay

ORIGIN = "https://www.example.com"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36"
KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}
VIEW = {"event_id": "quote_viewed", "transaction_id": "txn_malformed"}
SALE = {"event_id": "sale_completed", "transaction_id": "txn_malformed"}

INVALID_JSON = "Invalid JSON body"
NOT_OBJECT = "Invalid JSON body: expected an object"
UNSUPPORTED = "Unsupported content type"
EMPTY = "Empty body"
TOO_LARGE = "Request body too large"


@dataclass(frozen=True)
class Case:
    """One malformed request and what the relay must answer."""

    id: str
    body: bytes
    status: int
    message: str  # a substring of the answer's message
    content_type: str = "application/json"
    path: str = "/api/event/cmp_test"
    invalid: str | None = None  # a key expected in invalidFields


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def cases() -> Iterator[Case]:
    # --- not a JSON object at all ---------------------------------------------------------------
    for i, text in enumerate(
        [
            "[]",
            "[1]",
            '["event_id"]',
            '"string"',
            "1",
            "0",
            "-1",
            "1.5",
            "true",
            "false",
            "null",
            '[{"event_id": "quote_viewed"}]',
            "[[]]",
            '""',
        ]
    ):
        yield Case(f"top-level-{i}", text.encode(), 400, NOT_OBJECT)
    for i, text in enumerate(
        [
            "{",
            "}",
            '{"a":}',
            "{'event_id': 'x'}",
            '{"a": 1,}',
            '{"a" 1}',
            "not json",
            '{"a": 1}{"b": 2}',
            '{"a": 1} x',
            "NaN",
            "Infinity",
            "-Infinity",
            '{"amount": NaN}',
            '{"amount": Infinity}',
            '{"amount": -Infinity}',
            '{"a": undefined}',
            '{"a": 0x10}',
            '{"a": 01}',
            '{"a": .5}',
            '{"a": +1}',
            '{"a": "unterminated}',
            '{"a": "bad \\x escape"}',
            '{"a": "\\u12"}',
            "// comment\n{}",
            '{"a": 1 /* c */}',
            "{a: 1}",
            '{"a": True}',
            '{"a": None}',
            "{\"a\": 'single'}",
            '{"a": [1, 2}',
            "\x00",
            '{"a": "tab\tinside"}',
            '{"a": "newline\ninside"}',
            # Numbers whose exponent Decimal cannot hold (decimal.InvalidOperation, not a ValueError).
            '{"sub1": 1e-99999999999999999999}',
            '{"amount": 0e99999999999999999999}',
        ]
    ):
        yield Case(f"syntax-{i}", text.encode(), 400, INVALID_JSON)
    # --- invalid UTF-8 and other encodings ----------------------------------------------------------
    for i, data in enumerate(
        [
            b'{"event_id": "\xff", "transaction_id": "t"}',
            b'{"event_id": "\xc0\xaf"}',
            b'{"a": "\xed\xa0\x80"}',
            b'{"a": "\xe2\x82"}',
            b'{"a": "caf\xe9"}',
            b"\xfe\xff\x00{\x00}",
            b"\xff\xfe{\x00}\x00",
            '{"event_id": "quote_viewed"}'.encode("utf-16"),
            '{"event_id": "quote_viewed"}'.encode("utf-32"),
            b'{"a": "\x80\x80"}',
            b'\xef\xbb\xbf{"event_id": "quote_viewed", "transaction_id": "t"}',
            b'{"a": "\xf8\x88\x80\x80\x80"}',
            b'{"a": "\xf4\x90\x80\x80"}',
        ]
    ):
        yield Case(f"utf8-{i}", data, 400, INVALID_JSON)
    for name in ("sub1", "utm_source", "first_name"):  # valid JSON escapes that are not text
        yield Case(
            f"surrogate-{name}", raw({**VIEW, name: "\ud800"}), 400, f"Invalid fields: {name}", invalid=name
        )
    yield Case("surrogate-event_id", raw({**VIEW, "event_id": "\udfff"}), 400, "Invalid event_id")
    # --- content types ----------------------------------------------------------------------------------
    for ctype in (
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/html",
        "application/xml",
        "text/xml",
        "application/octet-stream",
        "image/png",
        "text/csv",
        "application/javascript",
        "application/json-patch+json",
        "application/ld+json",
        "garbage",
        "application/x-ndjson",
        "text/json5",
    ):
        yield Case(f"ctype-{ctype.split(';')[0]}", raw(VIEW), 415, UNSUPPORTED, content_type=ctype)
    # --- empty bodies --------------------------------------------------------------------------------------
    for ctype in ("application/json", "text/plain", "text/plain;charset=UTF-8"):
        for i, data in enumerate([b"", b"   ", b"\n\r\n", b"\t"]):
            yield Case(f"empty-{ctype}-{i}", data, 400, EMPTY, content_type=ctype)
    # --- required ids ------------------------------------------------------------------------------------------
    for name, other in (("event_id", "transaction_id"), ("transaction_id", "event_id")):
        base = {other: VIEW[other]}
        yield Case(f"{name}-absent", raw(base), 400, f"{name} is required")
        for label, value in (("null", None), ("empty", "")):
            yield Case(f"{name}-{label}", raw({**base, name: value}), 400, f"{name} is required")
        for label, value in (
            ("list", ["quote_viewed"]),
            ("dict", {"a": 1}),
            ("float", 1.5),
            ("true", True),
            ("false", False),
            ("blank", "   "),
            ("long", "x" * 129),
            ("nul", "a\x00b"),
            ("newline", "a\nb"),
            ("escape", "\x1b[31m"),
            ("empty-list", []),
            ("huge", "x" * 10000),
        ):
            yield Case(f"{name}-{label}", raw({**base, name: value}), 400, f"Invalid {name}")
    # --- attribution / lead string fields ------------------------------------------------------------------------
    bad_values = {
        "list": ["a"],
        "dict": {"a": "b"},
        "float": 1.5,
        "true": True,
        "false": False,
        "long": "x" * 256,
        "ctrl": "a\x01b",
        "nested": [[["a"]]],
    }
    for name in ("pid", "sub1", "adv3", "utm_term", "email", "quote_id"):
        for label, value in bad_values.items():
            yield Case(
                f"field-{name}-{label}",
                raw({**VIEW, name: value}),
                400,
                f"Invalid fields: {name}",
                invalid=name,
            )
    # --- consent -----------------------------------------------------------------------------------------------
    for label, value in (("2", 2), ("neg", -1), ("yes", "yes"), ("half", 0.5), ("list", []), ("str2", "2")):
        yield Case(
            f"tcpa_consent-{label}",
            raw({**VIEW, "tcpa_consent": value}),
            400,
            "Invalid fields: tcpa_consent",
            invalid="tcpa_consent",
        )
    for label, value in (
        ("feb30", "2026-02-30"),
        ("short", "26-01-01"),
        ("slash", "2026/01/01"),
        ("int", 20260101),
        ("datetime", "2026-01-01T00:00:00"),
        ("month13", "2026-13-01"),
    ):
        yield Case(
            f"tcpa_date-{label}",
            raw({**VIEW, "tcpa_consent_date": value}),
            400,
            "Invalid fields: tcpa_consent_date",
            invalid="tcpa_consent_date",
        )
    # --- revenue (sale_completed: conversion, max_revenue 5000) ----------------------------------------------------
    revenue_texts = {
        "neg": "-1",
        "neg-cent": "-0.01",
        "3dec": "1.005",
        "3dec-small": "0.001",
        "3dec-str": '"1.005"',
        "1e309": "1e309",
        "1e400": "1e400",
        "neg-1e309": "-1e309",
        "nan-str": '"NaN"',
        "inf-str": '"Infinity"',
        "exp-str": '"1e3"',
        "empty-str": '""',
        "space-str": '" 5"',
        "hex-str": '"0x10"',
        "true": "true",
        "list": "[45]",
        "dict": '{"v": 45}',
        "over-max": "5000.01",
        "huge": "1000000000000",
        "neg-zero-3dec": "-0.001",
        "comma-str": '"45,00"',
        "dollar-str": '"$45"',
    }
    for key, path, extra in (
        ("amount", "/api/event/cmp_test", {}),
        ("revenue", "/api/event/trigger", {"cid": "cmp_test"}),
    ):
        for label, text in revenue_texts.items():
            body = json.dumps({**extra, **SALE})[:-1] + f', "{key}": {text}}}'
            yield Case(f"{key}-{label}", body.encode(), 400, f"Invalid fields: {key}", path=path, invalid=key)
        yield Case(
            f"{key}-missing",
            raw({**extra, **SALE}),
            400,
            f"{key} is required for conversion events",
            path=path,
        )
        yield Case(f"{key}-null", raw({**extra, **SALE, key: None}), 400, f"{key} is required", path=path)
    # --- nesting -----------------------------------------------------------------------------------------------
    for depth in (2, 10, 100, 1000, 2000):
        # Shallow nesting is a wrong field type; beyond the parser's depth it is refused as such.
        message = "Invalid fields: {}" if depth <= 100 else INVALID_JSON
        yield Case(
            f"nested-value-{depth}",
            (
                '{"event_id": "quote_viewed", "transaction_id": "t", "sub1": '
                + "[" * depth
                + "]" * depth
                + "}"
            ).encode(),
            400,
            message.format("sub1"),
        )
        yield Case(
            f"nested-object-{depth}",
            (
                '{"event_id": "quote_viewed", "transaction_id": "t", "sub2": '
                + '{"a":' * depth
                + "1"
                + "}" * depth
                + "}"
            ).encode(),
            400,
            message.format("sub2"),
        )
    yield Case("nested-top-5000", b"[" * 5000 + b"]" * 5000, 400, INVALID_JSON)
    yield Case("nested-top-100000", b"[" * 16000, 400, INVALID_JSON)  # never closed, at the body limit
    # --- sizes and counts --------------------------------------------------------------------------------------
    yield Case("huge-string", raw({**VIEW, "sub1": "x" * 20000}), 413, TOO_LARGE)
    yield Case("huge-body-1mb", b'{"a": "' + b"x" * 1_000_000 + b'"}', 413, TOO_LARGE)
    yield Case("huge-body-text-plain", b" " * 17000 + raw(VIEW), 413, TOO_LARGE, content_type="text/plain")
    yield Case("many-fields-65", raw({**VIEW, **{f"x{i}": "v" for i in range(63)}}), 400, "Too many fields")
    yield Case("many-fields-1000", raw({f"f{i}": 1 for i in range(1000)}), 400, "Too many fields")
    yield Case("many-fields-3000", raw({f"f{i}": 1 for i in range(3000)}), 413, TOO_LARGE)
    # --- unknown and server-only fields -------------------------------------------------------------------------
    for name in (
        "upstream_url",
        "url",
        "__proto__",
        "constructor",
        "",
        " ",
        "event_id ",
        "EVENT_ID",
        "Sub1",
        "utm-source",
        "x" * 200,
        "sub6",
        "adv0",
        "$where",
        "a.b",
        "ip",
    ):
        yield Case(f"unknown-{name[:20]!r}", raw({**VIEW, name: "v"}), 400, "Invalid fields")
    for name in (
        "cost",
        "cost_operation",
        "adSpend",
        "min_price",
        "conversion_date",
        "conversion_timezone",
        "ip_address",
        "user_agent",
    ):
        yield Case(
            f"server-only-{name}", raw({**VIEW, name: "1"}), 400, f"Invalid fields: {name}", invalid=name
        )
    yield Case(
        "duplicate-keys-last-wins",
        b'{"event_id": "quote_viewed", "event_id": "nope", "transaction_id": "t"}',
        400,
        "Invalid event_id for this campaign",
    )
    # --- event_uuid, campaigns, trigger form ----------------------------------------------------------------------
    for label, value in (
        ("short", "abc"),
        ("long", "x" * 65),
        ("spaces", "a b c d e f g"),
        ("int", 12345678),
        ("slash", "../../../etc"),
        ("list", ["aaaaaaaa"]),
    ):
        yield Case(f"event_uuid-{label}", raw({**VIEW, "event_uuid": value}), 400, "Invalid event_uuid")
    for cid in ("cmp_nope", "CMP_TEST", "cmp_test.json", "trigger2", "cmp_test%20"):
        yield Case(f"campaign-{cid}", raw(VIEW), 404, "Campaign not found", path=f"/api/event/{cid}")
    for path in (
        "/api/event/..",
        "/api/event/cmp_test/..%2F..%2Fx",
        "/api/event/a%2Fb",
        "/api/event/cmp_test/x",
    ):
        yield Case(f"path-{path}", raw(VIEW), 404, "Not found", path=path)
    for label, body in (
        ("no-cid", raw(VIEW)),
        ("null-cid", raw({**VIEW, "cid": None})),
        ("empty-cid", raw({**VIEW, "cid": ""})),
    ):
        yield Case(f"trigger-{label}", body, 400, "cid is required", path="/api/event/trigger")
    for label, value in (("int", 5), ("list", ["cmp_test"]), ("dict", {"cid": "cmp_test"}), ("true", True)):
        yield Case(
            f"trigger-cid-{label}", raw({**VIEW, "cid": value}), 400, "Invalid cid", path="/api/event/trigger"
        )
    yield Case(
        "trigger-unknown-cid",
        raw({**VIEW, "cid": "cmp_nope"}),
        404,
        "Campaign not found",
        path="/api/event/trigger",
    )
    yield Case(
        "event-not-configured", raw({**VIEW, "event_id": "signup"}), 400, "Invalid event_id for this campaign"
    )


CASES = list(cases())


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox, pages_port: int) -> Iterator[Relay]:
    """One relay for the whole table."""
    server = make_relay(tmp_path_factory.mktemp("malformed"), sandbox.url, pages_port).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_request(relay: Relay, sandbox: Sandbox, client: httpx.Client, case: Case) -> None:
    headers = {"Origin": ORIGIN, "User-Agent": BROWSER, "Content-Type": case.content_type}
    response = client.post(relay.url + case.path, content=case.body, headers=headers)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    assert set(body) == KEYS and body["type"] == "error" and body["status"] == case.status
    assert case.message in body["message"], body
    if case.invalid is not None:
        assert case.invalid in body["invalidFields"] and body["invalidFields"][case.invalid], body
    assert sandbox.requests() == []
