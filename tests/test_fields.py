"""server/fields.py is the one field model: the OpenAPI request schema and the validator agree on
every field, both read the model's patterns, and config no longer imports validation.

schemathesis (tests/test_openapi.py) checks the relay's answers against the document; this checks
that the document's request rules and validate_event's rules are the same rules.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import fields, validation
from server.config import CampaignConfig, parse_config
from server.errors import ApiError
from server.openapi import build_spec
from server.sandbox import rules
from server.validation import parse_json_body, validate_event

SERVER = Path(__file__).resolve().parents[1] / "server"
BASE = {"event_id": "quote_viewed", "transaction_id": "txn_0001"}
# One value per pattern of the model, at the edges the pattern allows; the test checks each one
# matches its pattern, so a sample cannot silently drift from the rule it stands for.
PATTERN_SAMPLES: dict[str, tuple[str, ...]] = {
    fields.UUID_PATTERN: ("a" * 8, "A-z_09" + "x" * 58),
    fields.MONEY_PATTERN: ("0", "45", "45.1", "999999999.99", "1000000000.00"),
    fields.DATE_PATTERN: ("2026-01-31", "2024-02-29"),
    fields.CONVERSION_DATE_PATTERN: ("2026-01-31", "2026-01-31 23:59:59"),
    fields.ID_PATTERN: ("c", "cmp_" + "x" * 60),
}
FORMAT_SAMPLES = {"ipv4": "203.0.113.7", "ipv6": "2001:db8::1", "date": "2026-01-31"}
# Values outside each pattern: the validator must refuse them as the schema does.
PATTERN_REJECTS: dict[str, tuple[str, ...]] = {
    fields.UUID_PATTERN: ("short", "a" * 65, "has space1"),
    fields.MONEY_PATTERN: ("1.005", "-1", "1e3", "١٢", "1000000000.01", "9999999999"),
    fields.DATE_PATTERN: ("2026-1-5", "2026-01-31 10:00:00", "٢٠٢٦-٠١-٣١"),
}


def campaign() -> CampaignConfig:
    """A campaign that rejects unknown fields, so 'unknown field' tells a field the validator does not know."""
    config = parse_config(
        {
            "relay": {"upstream_url": "http://127.0.0.1:9", "store": "sqlite:///unused.sqlite3"},
            "campaigns": {
                "cmp_test": {
                    "allowed_origins": ["https://www.example.com"],
                    "unknown_fields": "reject",
                    "allow_server_calls": True,
                    "server_key": "sk_0123456789abcdef",
                    "events": {"quote_viewed": {}},
                }
            },
        }
    )
    return config.campaigns["cmp_test"]


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return build_spec(
        parse_config(
            {
                "relay": {"upstream_url": "http://127.0.0.1:9", "store": "sqlite:///unused.sqlite3"},
                "campaigns": {
                    "cmp_test": {"allowed_origins": ["https://www.example.com"], "events": {"e": {}}}
                },
            }
        )
    )


@pytest.fixture(scope="module")
def properties(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["components"]["schemas"]["EventBody"]["properties"]  # type: ignore[no-any-return]


def samples(schema: dict[str, Any]) -> Iterator[Any]:
    """Values that match ``schema`` (a property of EventBody), read off the schema itself."""
    for branch in schema.get("oneOf", ()):
        yield from samples({**{k: v for k, v in schema.items() if k != "oneOf"}, **branch})
    if "oneOf" in schema:
        return
    for branch in schema.get("anyOf", ()):
        yield FORMAT_SAMPLES[branch["format"]]
    if "enum" in schema:
        yield from schema["enum"]
    elif "pattern" in schema:
        yield from PATTERN_SAMPLES[schema["pattern"]]
    elif "format" in schema:
        yield FORMAT_SAMPLES[schema["format"]]
    elif schema["type"] == "number":
        yield from (schema["minimum"], 12.34, schema["maximum"])
    elif schema["type"] == "string" and "anyOf" not in schema:
        yield from ("x", "x" * schema.get("maxLength", 40))


def validate(body: dict[str, Any], *, trusted: bool) -> Any:
    """validate_event on ``body`` as the relay receives it: JSON bytes through parse_json_body."""
    parsed = parse_json_body(json.dumps(body).encode(), "application/json")
    return validate_event(campaign(), parsed, trusted=trusted)


def test_the_pattern_samples_match_their_patterns() -> None:
    for pattern, values in PATTERN_SAMPLES.items():
        assert all(re.match(pattern, v) for v in values), pattern
    for pattern, values in PATTERN_REJECTS.items():
        assert not any(re.match(pattern, v) for v in values), pattern


def test_every_field_of_the_schema_is_accepted_with_every_value_the_schema_allows(
    properties: dict[str, Any],
) -> None:
    checked = 0
    for name, schema in properties.items():
        if name in ("event_id", "transaction_id"):
            continue  # required ids: every body here carries them
        server_only = name in fields.SERVER_ONLY_FIELDS
        for value in samples(schema):
            jsonschema_rs.validate(schema, value)  # the sample is one the document allows
            try:
                event = validate({**BASE, name: value}, trusted=server_only)
            except ApiError as exc:
                pytest.fail(
                    f"{name}={value!r} matches the schema but validate_event refused it: {exc.body()}"
                )
            if name not in fields.CONTROL_FIELDS and name not in fields.CONVERSION_TIME_FIELDS:
                assert name in event.fields, name  # accepted, not silently dropped
            checked += 1
    assert checked > len(properties)  # every property gave at least one value


def test_server_only_fields_in_the_schema_are_refused_from_a_browser(properties: dict[str, Any]) -> None:
    for name in fields.SERVER_ONLY_FIELDS:
        value = next(samples(properties[name]))
        with pytest.raises(ApiError) as refused:
            validate({**BASE, name: value}, trusted=False)
        assert refused.value.body()["invalidFields"] == {name: "set by the server only"}
        assert "server-side callers only" in properties[name]["description"]


def known_to_the_validator(name: str) -> bool:
    """Whether validate_event knows ``name`` (the campaign rejects unknown fields with 'unknown field')."""
    try:
        validate({**BASE, name: "1"}, trusted=True)
    except ApiError as exc:
        return exc.body()["invalidFields"].get(name) != "unknown field"
    return True


def model_names() -> set[str]:
    """Every field name the model lists, in any of its tables."""
    names: set[str] = set()
    for value in vars(fields).values():
        if isinstance(value, (tuple, frozenset, dict)) and all(isinstance(x, str) for x in value):
            names |= set(value)
    return names - set(fields.COST_OPERATIONS) - set(fields.TIMEZONES)  # values, not field names


def test_every_field_the_validator_accepts_is_in_the_schema_and_no_other(
    spec: dict[str, Any],
    properties: dict[str, Any],
) -> None:
    trigger = spec["paths"]["/api/event/trigger"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    documented = set(properties) | set(trigger["allOf"][1]["properties"])  # cid: the trigger form's
    candidates = model_names() | documented | {"quote_id", "gclid_x", "Pid", "unknown"}
    accepted = {name for name in candidates if known_to_the_validator(name)}
    assert accepted == documented, {
        "accepted, undocumented": accepted - documented,
        "documented, refused": documented - accepted,
    }
    assert {"gclid", "utm_source", "email", "tcpa_consent", "cost", "cid"} <= accepted  # the probe works


@pytest.mark.parametrize("pattern", sorted(PATTERN_REJECTS))
def test_values_outside_a_pattern_are_refused_by_schema_and_validator(
    properties: dict[str, Any],
    pattern: str,
) -> None:
    names = [
        name
        for name, schema in properties.items()
        if pattern in (schema.get("pattern"), *(b.get("pattern") for b in schema.get("oneOf", ())))
    ]
    assert names, f"no property of the schema uses {pattern}"
    for name in names:
        for value in PATTERN_REJECTS[pattern]:
            assert not jsonschema_rs.is_valid(properties[name], value), (name, value)
            with pytest.raises(ApiError):
                validate({**BASE, name: value}, trusted=name in fields.SERVER_ONLY_FIELDS)


def test_the_document_and_the_checks_read_the_models_patterns(
    spec: dict[str, Any], properties: dict[str, Any]
) -> None:
    assert validation._UUID_RE.pattern == fields.UUID_PATTERN == properties["event_uuid"]["pattern"]
    assert (
        validation._DECIMAL_RE.pattern == fields.MONEY_PATTERN == properties["amount"]["oneOf"][1]["pattern"]
    )
    assert validation._DATE_RE.pattern == fields.DATE_PATTERN == properties["tcpa_consent_date"]["pattern"]
    assert (
        rules._DATE_RE.pattern == fields.CONVERSION_DATE_PATTERN == properties["conversion_date"]["pattern"]
    )
    cid = spec["paths"]["/api/event/{cid}"]["post"]["parameters"][0]
    assert cid["name"] == "cid" and cid["schema"]["pattern"] == fields.ID_PATTERN
    assert properties["conversion_timezone"]["enum"] == list(fields.TIMEZONES)
    assert properties["cost_operation"]["enum"] == list(fields.COST_OPERATIONS)


def imported_modules(module: Path) -> set[str]:
    """Every module ``module`` imports, at the top or inside a function (relative names resolved)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("server." + (node.module or "") if node.level else node.module or "")
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_config_does_not_import_validation() -> None:
    """The config<->validation cycle is gone (it hid behind a function-level import), and the field
    model imports nothing of the relay, so anything may read it."""
    config = imported_modules(SERVER / "config.py")
    assert "server.validation" not in config and "server.fields" in config
    assert not {name for name in imported_modules(SERVER / "fields.py") if name.startswith("server")}


# --- the money bound: the document and the validator draw the same line ------------------------------

MONEY_EDGES: tuple[Any, ...] = (
    0, 1000000000, 1000000000.01, 10**10, -0.01, 12.345,
    "0", "999999999.99", "0999999999.99", "1000000000", "1000000000.00", "1000000000.01",
    "1000000001", "9999999999", "00000000001", "45\n", " 45", "1e3",
)  # fmt: skip


def money_accepted(value: Any) -> bool:
    """Whether validate_event takes ``value`` as a trusted caller's ``cost`` (the same check as revenue)."""
    try:
        validate({**BASE, "cost": value}, trusted=True)
    except ApiError:
        return False
    return True


@pytest.mark.parametrize("value", MONEY_EDGES, ids=repr)
def test_the_money_bound_is_the_same_in_the_document_and_the_validator(
    properties: dict[str, Any], value: Any
) -> None:
    documented = jsonschema_rs.is_valid(properties["cost"], value)
    assert documented == money_accepted(value) == jsonschema_rs.is_valid(properties["amount"], value)


@given(
    value=st.from_regex(r"\A[0-9]{0,11}(\.[0-9]{0,3})?\Z")
    | st.decimals(min_value=-1, max_value=int(fields.MAX_REVENUE) * 10, places=2).map(float)
)
# too_slow and deadline time the machine, not the strategy (see test_openapi.TIMED).
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_money_value_is_accepted_by_both_or_by_neither(properties: dict[str, Any], value: Any) -> None:
    assert jsonschema_rs.is_valid(properties["cost"], value) == money_accepted(value), value
