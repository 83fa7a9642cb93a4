"""``/openapi.json`` is kept true: schemathesis calls every operation of the running app and checks
each answer against the document; hypothesis throws JSON-ish input at validation and at the endpoint.

In-process (the WSGI app, upstream = the session sandbox) with a bounded number of examples per
operation, so CI stays fast.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from server import create_app
from server.config import Config, parse_config
from server.errors import ApiError
from server.fields import ATTRIBUTION_FIELDS
from server.openapi import build_spec
from server.validation import parse_json_body, validate_event
from tests.conftest import Sandbox

ORIGIN = "https://www.example.com"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36"


def make_config(upstream: str, store: Path) -> Config:
    return parse_config(
        {
            "relay": {
                "upstream_url": upstream,
                "store": f"sqlite:///{store}",
                "inline_timeout": 0.5,
                "rate_limits": {"per_ip": "", "per_campaign": ""},
            },
            "campaigns": {
                "cmp_test": {
                    "allowed_origins": [ORIGIN],
                    "inactive_sources": ["src_paused"],
                    "extra_fields": ["quote_id"],
                    "secret": "s3cret",
                    "allow_server_calls": True,
                    "server_key": "sk_0123456789abcdef",
                    "events": {
                        "quote_viewed": {},
                        "sale_completed": {"conversion": True, "max_revenue": 5000},
                    },
                    "sdk": {"endpoint_path": "/p/collect"},
                    "postbacks": {
                        "ringba": {
                            "token": "t" * 32,
                            "event": "sale_completed",
                            "min_duration": 30,
                            "duration_param": "duration",
                            "params": {"tid": "transaction_id"},
                        }
                    },
                },
                "cmp_other": {
                    "allowed_origins": ["https://other.example.org"],
                    "bot_filter": True,
                    "events": {"signup": {}},
                },
            },
        }
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Iterator[Flask]:
    """The relay as a WSGI app, delivering to the session's sandbox."""
    application = create_app(
        make_config(sandbox.url, tmp_path_factory.mktemp("openapi") / "r.sqlite3"), start_delivery=False
    )
    yield application
    application.extensions["relay"].close()


@pytest.fixture(scope="module")
def spec(app: Flask) -> dict[str, Any]:
    return app.test_client().get("/openapi.json").get_json()  # type: ignore[no-any-return]


# Hypothesis's health checks stay on but one: too_slow times data generation on the wall clock, and this
# suite runs on a shared two-core machine under load; a timing is never a test verdict here.
WALL_CLOCK = [HealthCheck.too_slow]

# The document as the app serves it (test_the_document_covers_the_relay checks they are equal); loaded
# from a dict because the app needs the session's sandbox, which exists only once fixtures run.
HAS_METRICS = importlib.util.find_spec("server.metrics") is not None
schema = schemathesis.openapi.from_dict(
    build_spec(make_config("http://127.0.0.1:9", Path("unused.sqlite3")), has_metrics=HAS_METRICS)
)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=WALL_CLOCK)
def test_every_answer_matches_the_document(app: Flask, case: Any) -> None:
    case.call_and_validate(
        app=app, checks=[not_a_server_error, response_schema_conformance, status_code_conformance]
    )


def test_the_document_covers_the_relay(spec: dict[str, Any], app: Flask) -> None:
    paths = spec["paths"]
    assert spec["openapi"].startswith("3.")
    for path, methods in {
        "/api/event/{cid}": {"post", "options"},
        "/api/event/trigger": {"post"},
        "/p/collect": {"post", "options"},
        "/sdk/{cid}.js": {"get"},
        "/sdk/{cid}/pingtree.js": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/openapi.json": {"get"},
        "/postback/{cid}/{source}": {"get", "post"},
    }.items():
        assert methods <= set(paths[path]), path
    codes = set(paths["/api/event/{cid}"]["post"]["responses"])
    assert {"200", "202", "400", "403", "404", "413", "415", "429", "500"} <= codes
    assert "Retry-After" in paths["/api/event/{cid}"]["post"]["responses"]["429"]["headers"]
    has_metrics = any(rule.rule == "/metrics" for rule in app.url_map.iter_rules())
    assert ("/metrics" in paths) == has_metrics == HAS_METRICS
    assert schema.raw_schema == spec  # schemathesis tests exactly what the app serves


# --- hypothesis: validation never fails with anything but a 4xx, and its answers match the document -------

KNOWN = [
    "event_id",
    "transaction_id",
    "amount",
    "revenue",
    "event_uuid",
    "signature",
    "cid",
    "tcpa_consent",
    "tcpa_consent_date",
    "cost",
    "min_price",
    "quote_id",
    *ATTRIBUTION_FIELDS[:6],
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(
        ["quote_viewed", "sale_completed", "src_paused", "45.50", "1.005", "-1", "2026-01-01", "1", "0"]
    )
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
bodies = st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=12), json_values, max_size=12)


@pytest.fixture(scope="module")
def answer_schema(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["components"]["schemas"]["Answer"]  # type: ignore[no-any-return]


@given(body=bodies, revenue_key=st.sampled_from(["amount", "revenue"]), trusted=st.booleans())
@settings(max_examples=300, deadline=None, suppress_health_check=WALL_CLOCK)
def test_validation_answers_are_4xx_and_well_shaped(
    answer_schema: dict[str, Any], body: dict[str, Any], revenue_key: str, trusted: bool
) -> None:
    campaign = make_config("http://127.0.0.1:9", Path("/tmp/x.sqlite3")).campaigns["cmp_test"]
    try:
        event = validate_event(campaign, body, revenue_key=revenue_key, trusted=trusted)
    except ApiError as exc:
        assert exc.status in (400, 403), exc.body()
        jsonschema_rs.validate(answer_schema, exc.body())
        json.dumps(exc.body())  # always serialisable
    else:
        assert event.event_id in campaign.events
        json.dumps(dict(event.fields))  # forwardable as JSON


@given(
    raw=st.binary(max_size=300) | bodies.map(lambda b: json.dumps(b).encode()),
    ctype=st.sampled_from(
        ["application/json", "text/plain", "", "text/plain;charset=UTF-8", "application/xml"]
    ),
)
@settings(max_examples=150, deadline=None, suppress_health_check=WALL_CLOCK)
def test_parsing_never_fails_otherwise(answer_schema: dict[str, Any], raw: bytes, ctype: str) -> None:
    try:
        assert isinstance(parse_json_body(raw, ctype), dict)
    except ApiError as exc:
        assert exc.status in (400, 415)
        jsonschema_rs.validate(answer_schema, exc.body())


@given(
    raw=st.binary(max_size=200) | bodies.map(lambda b: json.dumps(b, default=str).encode()),
    path=st.sampled_from(["/api/event/cmp_test", "/api/event/trigger", "/p/collect", "/api/event/cmp_other"]),
    origin=st.sampled_from([ORIGIN, None, "https://evil.example", "null"]),
)
@settings(max_examples=120, deadline=None, suppress_health_check=WALL_CLOCK)
def test_the_endpoint_never_answers_5xx(
    app: Flask, answer_schema: dict[str, Any], raw: bytes, path: str, origin: str | None
) -> None:
    headers = {"User-Agent": BROWSER, "Content-Type": "application/json"}
    if origin:
        headers["Origin"] = origin
    response = app.test_client().post(path, data=raw, headers=headers)
    assert response.status_code < 500, response.get_data(as_text=True)
    jsonschema_rs.validate(answer_schema, response.get_json())


def test_the_server_key_is_a_security_scheme(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["serverKeyBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["serverKeyBearer"]["description"],
    }
    assert (schemes["serverKeyHeader"]["in"], schemes["serverKeyHeader"]["name"]) == (
        "header",
        "X-Server-Key",
    )
    post = spec["paths"]["/api/event/{cid}"]["post"]
    assert {} in post["security"] and {"serverKeyBearer": []} in post["security"]  # browsers need no key
    assert "Authorization: Bearer <key>" in post["description"] and "relay_fields" in post["description"]
