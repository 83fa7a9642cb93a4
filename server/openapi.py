"""``GET /openapi.json``: an OpenAPI 3.0 description of the relay's public HTTP API.

Built from the app itself (its configured first-party paths, and ``/metrics`` only when that
module is installed), so the document describes the relay that serves it. ``tests/test_openapi.py``
keeps it true: schemathesis calls every operation and checks each answer against this document.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app, jsonify

from .config import CampaignConfig, Config
from .fields import (
    ATTRIBUTION_FIELDS,
    CLICK_IDS,
    CONVERSION_DATE_PATTERN,
    COST_FIELDS,
    COST_OPERATIONS,
    DATE_PATTERN,
    ID_PATTERN,
    LEAD_FIELDS,
    MAX_FIELDS,
    MAX_ID,
    MAX_REVENUE,
    MAX_STRING,
    MAX_USER_AGENT,
    MONEY_PATTERN,
    TIMEZONES,
    UUID_HINT,
    UUID_PATTERN,
)
from .relay import current_relay

JSON = "application/json"
JS = "application/javascript"


def init_app(app: Flask) -> None:
    """Register ``GET /openapi.json``."""
    app.add_url_rule("/openapi.json", "openapi", _serve, methods=["GET"])


def _serve() -> Response:
    spec = current_app.extensions.get("openapi_spec")
    if spec is None:  # built on first use: every init_app has registered its routes by then
        routes = {rule.rule for rule in current_app.url_map.iter_rules()}
        spec = build_spec(current_relay().config, has_metrics="/metrics" in routes)
        current_app.extensions["openapi_spec"] = spec
    return jsonify(spec)


def build_spec(config: Config, *, has_metrics: bool = False) -> dict[str, Any]:
    """The OpenAPI document for a relay with ``config`` (pure)."""
    example_cid = next(iter(config.campaigns), "cmp_example")
    paths: dict[str, Any] = {
        "/api/event/{cid}": {
            "post": _event_post(
                "Fire an event (Pingtree's campaign form; revenue as `amount`)",
                "eventByCampaign",
                [_cid_param(example_cid)],
                "amount",
            ),
            "options": _preflight("preflightByCampaign", [_cid_param(example_cid)]),
        },
        "/api/event/trigger": {
            "post": _event_post(
                "Fire an event (Pingtree's trigger form; `cid` in the body, revenue as `revenue`)",
                "eventTrigger",
                [],
                "revenue",
                cid_in_body=example_cid,
            ),
        },
        "/postback/{cid}/{source}": _postback(example_cid, config),
        "/sdk/{cid}.js": {
            "get": _script("The campaign's browser SDK", "sdkScript", [_cid_param(example_cid)])
        },
        "/sdk/{cid}/pingtree.js": {
            "get": _script(
                "The campaign's browser SDK (alternate name)", "sdkScriptAlt", [_cid_param(example_cid)]
            ),
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness",
                "responses": {"200": _json("The process serves", {"$ref": "#/components/schemas/Health"})},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: the store takes a write",
                "responses": {
                    "200": _json("Ready", {"$ref": "#/components/schemas/Ready"}),
                    "503": _json(
                        "The store is unreachable or refuses writes", {"$ref": "#/components/schemas/Ready"}
                    ),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": _json("OpenAPI 3.0 document", {"type": "object"})},
            }
        },
    }
    if has_metrics:
        paths["/metrics"] = {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        }
    for cid, campaign in config.campaigns.items():
        _first_party(paths, cid, campaign)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "pingtree-relay",
            "version": "1",
            "description": "A durable relay in front of Pingtree's Event Postback API, and the browser SDK it "
            "serves. Every JSON answer of the event endpoints has Pingtree's shape.",
        },
        "paths": paths,
        "components": {"schemas": _schemas(), "securitySchemes": SECURITY_SCHEMES},
    }


def _first_party(paths: dict[str, Any], cid: str, campaign: CampaignConfig) -> None:
    sdk = campaign.sdk
    if sdk.endpoint_path:
        paths[sdk.endpoint_path] = {
            "post": _event_post(
                f"Fire an event of {cid} at its first-party path", f"eventFirstParty_{cid}", [], "amount"
            ),
            "options": _preflight(f"preflightFirstParty_{cid}", []),
        }
    if sdk.script_path:
        paths[sdk.script_path] = {
            "get": _script(f"The SDK of {cid} at its first-party path", f"sdkFirstParty_{cid}", [])
        }


def _postback(example_cid: str, config: Config) -> dict[str, Any]:
    """``GET|POST /postback/{cid}/{source}``: the same answers for both methods."""
    campaign = config.campaigns.get(example_cid)
    example_source = next(iter(campaign.postbacks), "ringba") if campaign is not None else "ringba"
    params = [
        _cid_param(example_cid),
        {
            "name": "source",
            "in": "path",
            "required": True,
            "example": example_source,
            "description": "A source configured under [campaigns.{cid}.postbacks.{source}]",
            "schema": {"type": "string", "pattern": ID_PATTERN},
        },
        {
            "name": "token",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "The source's token (or send X-Postback-Token)",
        },
        _header("X-Postback-Token", "The source's token (instead of ?token=)"),
    ]
    description = (
        "A conversion reported by a server (call tracking, a buyer). Parameters in the query string "
        "and/or the body, named the platform's way; the source's params table maps them to "
        "Pingtree's names, and the result goes through the same validation, store and delivery as "
        "a browser's event. No Origin needed: the token is the credential. See docs/postbacks.md."
    )
    responses = {
        "200": _json("Delivered to Pingtree (or a repeat of a delivered postback: same ids)", ANSWER),
        "202": _json("Accepted and queued for delivery", ANSWER),
        "400": _json(
            "Call shorter than min_duration, no transaction id, an amount with a currency symbol, an "
            "unfilled macro, a parameter given twice, invalid fields, or Pingtree's own rejection",
            ANSWER,
        ),
        "401": _json("No token", ANSWER),
        "403": _json("Wrong token, or Source Inactive", ANSWER),
        "404": _json(
            "Campaign or postback source not found (or, through the global API, Lead Not Found)", ANSWER
        ),
        "405": _json("HEAD: only GET and POST fire a postback", ANSWER),
        "413": _json("Body larger than relay.max_body_bytes", ANSWER),
        "415": _json("A body that is neither JSON nor a form", ANSWER),
        "4XX": _json("Another rejection passed through from Pingtree", ANSWER),
        "500": _json("Internal error (never a stack trace)", ANSWER),
        "503": _json(
            "The store is unreachable: nothing was accepted, retry after Retry-After", ANSWER, RETRY_AFTER
        ),
        "5XX": _json("Pingtree's permanent failure passed through", ANSWER),
    }
    scalar = {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
    body_schema = {
        "type": "object",
        "additionalProperties": scalar,
        "example": {"tid": "txn_7f3a2b1c", "payout": "25.00", "duration": 184},
    }
    form_schema = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        "get": {
            "operationId": "postbackGet",
            "summary": "A postback as a GET URL with macros filled in",
            "description": description,
            "parameters": params,
            "responses": responses,
        },
        "post": {
            "operationId": "postbackPost",
            "summary": "A postback as a POST (JSON or form body)",
            "description": description,
            "parameters": params,
            "responses": responses,
            "requestBody": {
                "required": False,
                "content": {
                    JSON: {"schema": body_schema},
                    "application/x-www-form-urlencoded": {"schema": form_schema},
                },
            },
        },
    }


def _cid_param(example: str) -> dict[str, Any]:
    return {
        "name": "cid",
        "in": "path",
        "required": True,
        "example": example,
        "schema": {"type": "string", "pattern": ID_PATTERN},
    }


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


ANSWER = {"$ref": "#/components/schemas/Answer"}
# Anonymous ({}) for browsers, or the campaign's server key in either header.
SECURITY: list[dict[str, list[str]]] = [{}, {"serverKeyBearer": []}, {"serverKeyHeader": []}]
SECURITY_SCHEMES = {
    "serverKeyBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The campaign's server_key, for server-side callers (no Origin)",
    },
    "serverKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Server-Key",
        "description": "The same key in a header of its own",
    },
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}}


def _event_post(
    summary: str,
    operation_id: str,
    params: list[dict[str, Any]],
    revenue_key: str,
    *,
    cid_in_body: str | None = None,
) -> dict[str, Any]:
    body_schema: dict[str, Any] = {"$ref": "#/components/schemas/EventBody"}
    example: dict[str, Any] = {"event_id": "quote_viewed", "transaction_id": "txn_0001"}
    if cid_in_body is not None:
        body_schema = {
            "allOf": [
                body_schema,
                {"type": "object", "required": ["cid"], "properties": {"cid": {"type": "string"}}},
            ]
        }
        example = {"cid": cid_in_body, **example}
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": f"Revenue goes in `{revenue_key}` (both names are accepted). Browsers must send an allowed "
        "`Origin` and need no key. Server-side callers send no `Origin` and give the campaign's "
        "server key instead (`Authorization: Bearer <key>` or `X-Server-Key`; the campaign needs "
        "`allow_server_calls`); they may also pass the visitor's `ip_address` and `user_agent`, "
        "and their answers carry `data.relay_fields`: each server-decided field the relay "
        "`set` or `replaced`.",
        "security": SECURITY,
        "parameters": [
            *params,
            _header("Origin", "The page's origin; must be one of the campaign's allowed_origins"),
            _header("Idempotency-Key", f"{UUID_HINT}; a retry with the same key is a replay"),
        ],
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": body_schema, "example": example},
                "text/plain": {"schema": body_schema, "example": example},  # sendBeacon: no CORS preflight
            },
        },
        "responses": {
            "200": _json("Delivered to Pingtree; its answer, with the relay's event_uuid", ANSWER),
            "202": _json(
                "Accepted and queued for delivery (type queued), or from a known robot and not "
                "forwarded (type filtered)",
                ANSWER,
            ),
            "400": _json(
                "Invalid body or fields, missing event_id / transaction_id / revenue, or Pingtree's "
                "own rejection (e.g. duplicate)",
                ANSWER,
            ),
            "403": _json(
                "Origin not allowed, server key missing or wrong, revenue signature missing or wrong, "
                "or Source Inactive",
                ANSWER,
            ),
            "404": _json("Campaign not found", ANSWER),
            "413": _json("Body larger than relay.max_body_bytes", ANSWER),
            "415": _json("Content type other than application/json or text/plain", ANSWER),
            "422": _json(
                "event_uuid / Idempotency-Key already used in this campaign for a different event", ANSWER
            ),
            "429": _json("Rate limit per client IP or per campaign", ANSWER, RETRY_AFTER),
            "4XX": _json("Another rejection passed through from Pingtree", ANSWER),
            "500": _json("Internal error (never a stack trace)", ANSWER),
            "503": _json(
                "The store is unreachable: nothing was accepted, retry after Retry-After", ANSWER, RETRY_AFTER
            ),
            "5XX": _json("Pingtree's permanent failure passed through", ANSWER),
        },
    }


def _preflight(operation_id: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": "CORS preflight",
        "parameters": [
            *params,
            _header("Origin", "The page's origin"),
            _header("Access-Control-Request-Method", "POST"),
        ],
        "responses": {
            "204": {"description": "Allowed; CORS headers echo the origin"},
            "403": _json("Origin not allowed", ANSWER),
            "404": _json("Not found", ANSWER),
            "429": _json("Rate limited", ANSWER, RETRY_AFTER),
            "500": _json("Internal error", ANSWER),
        },
    }


def _script(summary: str, operation_id: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    script = {JS: {"schema": {"type": "string"}}}
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": {"description": "The script (br or gzip when accepted)", "content": script},
            "304": {"description": "Not modified (If-None-Match)"},
            "404": {
                "description": "Unknown campaign: a JavaScript comment (or a JSON answer for a path that "
                "is no script at all)",
                "content": {**script, JSON: {"schema": ANSWER}},
            },
            "500": _json("Internal error", ANSWER),
        },
    }


def _schemas() -> dict[str, Any]:
    string = {"type": "string", "maxLength": MAX_STRING}
    fields = {name: string for name in (*ATTRIBUTION_FIELDS, *CLICK_IDS, *LEAD_FIELDS)}
    money = {
        "oneOf": [
            {"type": "number", "minimum": 0, "maximum": float(MAX_REVENUE), "multipleOf": 0.01},
            {"type": "string", "pattern": MONEY_PATTERN},
        ]
    }
    trusted = "server-side callers only (a browser's is refused)"
    server_only = {
        **{name: {**money, "description": trusted} for name in COST_FIELDS},
        "cost_operation": {"type": "string", "enum": list(COST_OPERATIONS), "description": trusted},
        "ip_address": {
            "type": "string",
            "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
            "description": f"the visitor's IPv4 or IPv6 address; {trusted}",
        },
        "user_agent": {
            "type": "string",
            "maxLength": MAX_USER_AGENT,
            "description": f"the visitor's User-Agent; {trusted}",
        },
        **{
            name: {"type": "string", **schema, "description": f"{trusted}; ignored: always the relay's own"}
            for name, schema in (
                ("conversion_date", {"pattern": CONVERSION_DATE_PATTERN}),
                ("conversion_timezone", {"enum": list(TIMEZONES)}),
            )
        },
    }
    return {
        "Answer": {
            "type": "object",
            "description": "Pingtree's answer shape, used for every answer of the event endpoints",
            "required": ["status", "type", "message", "data", "missingFields", "invalidFields"],
            "properties": {
                "status": {"type": "integer", "minimum": 100, "maximum": 599},
                "type": {"type": "string", "enum": ["success", "error", "queued", "filtered"]},
                "message": {"type": "string", "minLength": 1},
                "data": {"type": "object"},
                "missingFields": {"type": "object", "additionalProperties": {"type": "string"}},
                "invalidFields": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "EventBody": {
            "type": "object",
            "description": f"At most {MAX_FIELDS} fields, scalars only. Unknown fields are rejected (or dropped, per "
            "campaign); cost, cost_operation, adSpend, min_price and the campaign's server "
            "fields are for server-side callers only.",
            "required": ["event_id", "transaction_id"],
            "maxProperties": MAX_FIELDS,
            "properties": {
                "event_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID},
                "transaction_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID},
                "event_uuid": {"type": "string", "pattern": UUID_PATTERN},
                "amount": money,
                "revenue": money,
                "signature": {"type": "string", "description": "hex HMAC-SHA256 for signed revenue"},
                "tcpa_consent": {"type": "integer", "enum": [0, 1]},
                "tcpa_consent_date": {"type": "string", "format": "date", "pattern": DATE_PATTERN},
                **fields,
                **server_only,
            },
            "additionalProperties": {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]},
        },
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        "Ready": {
            "type": "object",
            "required": ["status", "store"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "store": {"type": "string", "enum": ["ok", "unwritable", "unreachable"]},
                "store_error": {
                    "type": "string",
                    "description": "Why the store refuses writes (full disk, Redis OOM)",
                },
                "persistence": {
                    "type": "object",
                    "nullable": True,
                    "required": ["state", "detail"],
                    "description": (
                        "Whether a restart of the store keeps queued events "
                        "(reported; not a reason to be unready)"
                    ),
                    "properties": {
                        "state": {"type": "string", "enum": ["ok", "snapshots", "off", "unknown"]},
                        "detail": {"type": "string"},
                    },
                },
                "upstream": {
                    "type": "object",
                    "required": ["state", "detail"],
                    "description": "The latest attempt upstream from any worker of this box; failing still means ready (it queues)",
                    "properties": {
                        "state": {"type": "string", "enum": ["ok", "failing", "unknown"]},
                        "detail": {"type": "string"},
                        "age_seconds": {"type": "number"},
                        "note": {"type": "string"},
                    },
                },
                "queue": {"type": "object", "nullable": True},
            },
        },
    }
