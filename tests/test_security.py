"""Security and abuse resistance over real HTTP: who may post what, from where, how often.

One module-scoped relay (``secure``) runs a hardened cmp_test: server calls with a key, signed
revenue on sale_completed, bot filtering, a first-party endpoint path. Rules that need their own
settings (proxy hops, rate limits) start their own relay. Everything forwarded is checked at the
session's Pingtree sandbox; "nothing forwarded" is checked there too, and against a decoy listener
for the no-open-proxy rules.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import create_app
from server.config import ConfigError, parse_config
from server.validation import sign_revenue
from tests.conftest import (
    ROOT,
    InProcessRelay,
    InProcessRelayFactory,
    Relay,
    RelayFactory,
    Sandbox,
    make_relay,
    wait_for,
)

pytest_plugins = ["tests.redis_fixture"]

ORIGIN = "https://www.example.com"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
SERVER_KEY = "sk_test_0123456789abcdef"
SECRET = "merchant-backend-secret"
KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}

SECURE_CAMPAIGNS = f"""
[campaigns.cmp_test]
allowed_origins = ["{ORIGIN}"]
allow_server_calls = true
server_key = "{SERVER_KEY}"
secret = "{SECRET}"
bot_filter = true
extra_fields = ["quote_id"]
[campaigns.cmp_test.sdk]
endpoint_path = "/p/collect"
[campaigns.cmp_test.events.quote_viewed]
inline = true
[campaigns.cmp_test.events.form_submitted]
inline = true
[campaigns.cmp_test.events.sale_completed]
conversion = true
revenue = "signed"

[campaigns.cmp_other]
allowed_origins = ["https://other.example.org"]
[campaigns.cmp_other.events.signup]
inline = true
"""


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox, pages_port: int) -> Iterator[Relay]:
    """The hardened relay, trusted_proxy_hops = 0 (the default)."""
    relay = make_relay(tmp_path_factory.mktemp("secure"), sandbox.url, pages_port, SECURE_CAMPAIGNS).start()
    yield relay
    relay.kill()


def txn() -> str:
    return f"txn_{uuid.uuid4()}"


def send(
    relay: Relay | InProcessRelay,
    body: Any,
    *,
    path: str = "/api/event/cmp_test",
    origin: str | None = ORIGIN,
    ua: str | None = BROWSER,
    **headers: str,
) -> httpx.Response:
    """POST ``body`` like a browser on ``origin`` would (no Origin and no UA when None)."""
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if origin is not None:
        h["Origin"] = origin
    h["User-Agent"] = ua if ua is not None else ""
    kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"content": body}
    response = relay.request("POST", path, headers=h, timeout=15, **kw)
    if response.headers.get("content-type", "").startswith("application/json"):
        assert set(response.json()) == KEYS, response.text
    return response


def arrived(sandbox: Sandbox, t: str) -> list[dict[str, Any]]:
    return sandbox.events(transaction_id=t)


# --- server-side callers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            None,
            "Requests without an Origin header need the campaign's server key (campaigns.cmp_test.server_key in "
            "the relay's config): send it as 'Authorization: Bearer <key>' or 'X-Server-Key: <key>'",
        ),
        ("sk_wrong", "Invalid server key"),
        (SERVER_KEY[:-1], "Invalid server key"),
        (SERVER_KEY + "x", "Invalid server key"),
    ],
)
def test_server_calls_need_the_right_key(
    secure: Relay, sandbox: Sandbox, key: str | None, message: str
) -> None:
    headers = {"X_Server_Key": key} if key else {}
    response = send(secure, {"event_id": "quote_viewed", "transaction_id": txn()}, origin=None, **headers)
    assert (response.status_code, response.json()["message"]) == (403, message)
    assert sandbox.requests() == []


def test_trusted_caller_may_set_costs_and_is_never_bot_filtered(secure: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = send(
        secure,
        {
            "event_id": "quote_viewed",
            "transaction_id": t,
            "cost": 3.5,
            "min_price": 12,
            "cost_operation": "override",
            "adSpend": "0.75",
            "ip_address": "6.6.6.6",
            "conversion_date": "1999-01-01",
        },
        origin=None,
        ua="python-httpx/0.28",
        X_Server_Key=SERVER_KEY,
    )
    assert response.status_code == 200, response.text
    [event] = arrived(sandbox, t)
    body = event["body"]
    assert (body["cost"], body["min_price"], body["cost_operation"], body["adSpend"]) == (
        3.5,
        12.0,
        "override",
        0.75,
    )
    # The visitor's address is the backend's to give (callers.py); the moment received stays the relay's.
    assert body["ip_address"] == "6.6.6.6" and body["conversion_date"] != "1999-01-01"
    assert response.json()["data"]["relay_fields"] == {
        "conversion_date": "replaced",
        "conversion_timezone": "set",
    }


def test_trusted_caller_costs_are_still_checked(secure: Relay, sandbox: Sandbox) -> None:
    response = send(
        secure,
        {"event_id": "quote_viewed", "transaction_id": txn(), "cost": -1, "cost_operation": "steal"},
        origin=None,
        X_Server_Key=SERVER_KEY,
    )
    assert response.status_code == 400
    assert set(response.json()["invalidFields"]) == {"cost", "cost_operation"}
    assert sandbox.requests() == []


@pytest.mark.parametrize(
    "field",
    [
        "cost",
        "cost_operation",
        "adSpend",
        "min_price",
        "conversion_date",
        "conversion_timezone",
        "ip_address",
        "user_agent",
    ],
)
def test_browsers_may_not_set_server_fields(secure: Relay, sandbox: Sandbox, field: str) -> None:
    response = send(secure, {"event_id": "quote_viewed", "transaction_id": txn(), field: "1"})
    assert response.status_code == 400
    assert response.json()["invalidFields"] == {field: "set by the server only"}
    assert sandbox.requests() == []


def test_a_key_does_not_open_a_campaign_without_server_calls(secure: Relay, sandbox: Sandbox) -> None:
    response = send(
        secure,
        {"event_id": "signup", "transaction_id": txn()},
        path="/api/event/cmp_other",
        origin=None,
        X_Server_Key=SERVER_KEY,
    )
    assert response.status_code == 403
    assert response.json()["message"].startswith("Origin header missing.")
    assert sandbox.requests() == []


# --- signed revenue (over HTTP: there is no browser fixture in tests/browser yet) ----------------------


def cli_sign(t: str, amount: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "sign",
            "--cid",
            "cmp_test",
            "--transaction-id",
            t,
            "--event-id",
            "sale_completed",
            "--amount",
            amount,
            "--secret",
            SECRET,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_signed_conversion_end_to_end(secure: Relay, sandbox: Sandbox) -> None:
    t = txn()
    token = cli_sign(t, "45.5")
    assert token == sign_revenue(SECRET, "cmp_test", t, "sale_completed", "45.50")  # CLI and helper agree
    response = send(
        secure,
        {"event_id": "sale_completed", "transaction_id": t, "amount": 45.5, "signature": token},
        path="/p/collect",
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"]["conversion_id"].startswith("conv_")
    [event] = arrived(sandbox, t)
    assert event["body"]["amount"] == 45.5 and "signature" not in event["body"]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("amount", "Invalid revenue signature"),
        ("signature", "Invalid revenue signature"),
        ("other_transaction", "Invalid revenue signature"),
        ("other_event", "Invalid revenue signature"),
        ("missing", "Missing revenue signature"),
    ],
)
def test_tampered_conversion_is_403(secure: Relay, sandbox: Sandbox, tamper: str, message: str) -> None:
    t = txn()
    body: dict[str, Any] = {
        "event_id": "sale_completed",
        "transaction_id": t,
        "amount": 45.5,
        "signature": sign_revenue(SECRET, "cmp_test", t, "sale_completed", "45.50"),
    }
    if tamper == "amount":
        body["amount"] = 4550  # the page edits the price
    elif tamper == "signature":
        body["signature"] = body["signature"][:-1] + ("0" if body["signature"][-1] != "0" else "1")
    elif tamper == "other_transaction":
        body["signature"] = sign_revenue(
            SECRET, "cmp_test", txn(), "sale_completed", "45.50"
        )  # replayed elsewhere
    elif tamper == "other_event":
        body["signature"] = sign_revenue(SECRET, "cmp_test", t, "quote_viewed", "45.50")
    else:
        del body["signature"]
    response = send(secure, body)
    assert (response.status_code, response.json()["message"]) == (403, message)
    assert sandbox.requests() == []


# --- bots --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ua",
    [
        "curl/8.5.0",
        "Wget/1.21",
        "python-requests/2.32",
        "Googlebot/2.1 (+http://www.google.com/bot.html)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/126.0 Safari/537.36",
        "facebookexternalhit/1.1",
        None,
    ],
)
def test_bots_are_accepted_but_not_forwarded(secure: Relay, sandbox: Sandbox, ua: str | None) -> None:
    bot_txn, human_txn = txn(), txn()
    response = send(secure, {"event_id": "quote_viewed", "transaction_id": bot_txn}, ua=ua)
    assert response.status_code == 202 and response.json()["type"] == "filtered", response.text
    # A browser's event right after is forwarded; by then the robot's would have been too.
    assert send(secure, {"event_id": "quote_viewed", "transaction_id": human_txn}).status_code == 200
    wait_for(lambda: arrived(sandbox, human_txn), message="the browser's event")
    assert [r for r in sandbox.requests() if bot_txn in str(r["body"])] == []


def test_a_robot_still_gets_its_validation_errors(secure: Relay) -> None:
    response = send(secure, {"event_id": "nope", "transaction_id": txn()}, ua="curl/8")
    assert (response.status_code, response.json()["message"]) == (400, "Invalid event_id for this campaign")


def test_filtered_is_reported_with_its_reason(tmp_path: Path) -> None:
    config = parse_config(
        {
            "relay": {
                "upstream_url": "http://127.0.0.1:9",
                "store": f"sqlite:///{tmp_path / 'r.sqlite3'}",
                "rate_limits": {"per_ip": "", "per_campaign": ""},
            },
            "campaigns": {"c1": {"allowed_origins": [ORIGIN], "bot_filter": True, "events": {"view": {}}}},
        }
    )
    app = create_app(config, start_delivery=False)
    seen: list[tuple[str, dict[str, Any]]] = []
    app.extensions["relay"].observers.add(lambda kind, fields: seen.append((kind, fields)))
    response = app.test_client().post(
        "/api/event/c1",
        json={"event_id": "view", "transaction_id": "t-1"},
        headers={"Origin": ORIGIN, "User-Agent": "curl/8"},
    )
    assert response.status_code == 202
    assert ("filtered", {"cid": "c1", "event_id": "view", "reason": "bot"}) in seen
    assert not [k for k, _ in seen if k == "accepted"]
    assert app.extensions["relay"].store.find(cid="c1") == []  # never stored
    app.extensions["relay"].close()


def in_process_app(tmp_path: Path, **campaign: Any) -> Any:
    config = parse_config(
        {
            "relay": {
                "upstream_url": "http://127.0.0.1:9",
                "store": f"sqlite:///{tmp_path / 'r.sqlite3'}",
                "rate_limits": {"per_ip": "", "per_campaign": ""},
            },
            "campaigns": {"c1": {"allowed_origins": [ORIGIN], "events": {"view": {}}, **campaign}},
        }
    )
    return create_app(config, start_delivery=False)


@pytest.mark.parametrize(
    "ua",
    [
        "Mozilla/5.0 (Linux; Android 11; CUBOT X50) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/108.0.0.0 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 9; CUBOT_P30) AppleWebKit/537.36 Chrome/99 Mobile Safari/537.36",
    ],
)
def test_a_phone_whose_model_name_holds_bot_is_a_visitor(tmp_path: Path, ua: str) -> None:
    """CUBOT phones: "bot" in the model name must not cost a real visitor's events (202, never stored)."""
    app = in_process_app(tmp_path, bot_filter=True)
    response = app.test_client().post(
        "/api/event/c1",
        json={"event_id": "view", "transaction_id": "t-1"},
        headers={"Origin": ORIGIN, "User-Agent": ua},
    )
    assert response.status_code == 202 and response.json["type"] != "filtered", response.json
    assert [r.transaction_id for r in app.extensions["relay"].store.find(cid="c1")] == ["t-1"]
    # A robot that says so on the same phone's UA is still one.
    robot = app.test_client().post(
        "/api/event/c1",
        json={"event_id": "view", "transaction_id": "t-2"},
        headers={"Origin": ORIGIN, "User-Agent": ua + " (compatible; Googlebot/2.1)"},
    )
    assert robot.json["type"] == "filtered"
    app.extensions["relay"].close()


def test_a_staging_page_can_read_its_429(tmp_path: Path) -> None:
    """The SDK backs off on a 429 it can read; a staging origin's page must be able to read it too."""
    staging = "https://preview.example.org"
    config = parse_config(
        {
            "relay": {
                "upstream_url": "http://127.0.0.1:9",
                "store": f"sqlite:///{tmp_path / 'r.sqlite3'}",
                "rate_limits": {"per_ip": "1/minute", "per_campaign": ""},
            },
            "campaigns": {
                "c1": {"allowed_origins": [ORIGIN], "staging_origins": [staging], "events": {"view": {}}}
            },
        }
    )
    app = create_app(config, start_delivery=False)
    headers = {"Origin": staging, "User-Agent": BROWSER}
    post = lambda: app.test_client().post(  # noqa: E731
        "/api/event/c1", json={"event_id": "view", "transaction_id": "t-1"}, headers=headers
    )
    assert post().status_code in (200, 202)
    limited = post()
    assert limited.status_code == 429
    assert limited.headers["Access-Control-Allow-Origin"] == staging
    app.extensions["relay"].close()


# --- first-party endpoint path (ad blockers) ---------------------------------------------------------------


def test_first_party_endpoint_path_behaves_like_the_api(secure: Relay, sandbox: Sandbox) -> None:
    t = txn()
    response = send(
        secure, {"event_id": "quote_viewed", "transaction_id": t, "quote_id": "q1"}, path="/p/collect"
    )
    assert response.status_code == 200 and response.headers["Access-Control-Allow-Origin"] == ORIGIN
    [event] = arrived(sandbox, t)
    assert event["cid"] == "cmp_test" and event["body"]["quote_id"] == "q1"
    # Same rules as /api/event/cmp_test: origins, fields.
    assert (
        send(
            secure,
            {"event_id": "quote_viewed", "transaction_id": txn()},
            path="/p/collect",
            origin="https://evil.example",
        ).status_code
        == 403
    )
    assert (
        send(
            secure, {"event_id": "quote_viewed", "transaction_id": txn(), "cost": 1}, path="/p/collect"
        ).status_code
        == 400
    )
    preflight = httpx.options(
        secure.url + "/p/collect", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert httpx.get(secure.url + "/p/collect").status_code == 405
    assert httpx.post(secure.url + "/p/collect/x", headers={"Origin": ORIGIN}).status_code == 404


BASE = {"relay": {"upstream_url": "http://127.0.0.1:9"}}


@pytest.mark.parametrize(
    ("sdk_a", "sdk_b", "message"),
    [
        ({"endpoint_path": "/api/event/x"}, {}, "collides with a built-in route"),
        ({"endpoint_path": "/sdk/c1.js"}, {}, "collides with a built-in route"),
        ({"endpoint_path": "/healthz"}, {}, "collides with a built-in route"),
        ({"endpoint_path": "/admin/x"}, {}, "collides with a built-in route"),
        ({"endpoint_path": "/"}, {}, "collides with a built-in route"),
        ({"endpoint_path": "/p/../api/event/x"}, {}, "expected an absolute path"),
        ({"endpoint_path": "/p/<cid>"}, {}, "expected an absolute path"),
        ({"endpoint_path": "/e"}, {"endpoint_path": "/e"}, "already used by campaigns.c1"),
        ({"endpoint_path": "/e"}, {"script_path": "/e"}, "is also a script_path"),
    ],
)
def test_endpoint_paths_cannot_collide(sdk_a: dict[str, str], sdk_b: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "campaigns": {"c1": {"sdk": sdk_a}, "c2": {"sdk": sdk_b}}})
    assert message in str(info.value)
    assert info.value.path.endswith(".sdk.endpoint_path")


# --- client IP -----------------------------------------------------------------------------------------------


def test_x_forwarded_for_ignored_without_trusted_hops(secure: Relay, sandbox: Sandbox) -> None:
    t = txn()
    assert (
        send(
            secure, {"event_id": "quote_viewed", "transaction_id": t}, X_Forwarded_For="203.0.113.9"
        ).status_code
        == 200
    )
    assert arrived(sandbox, t)[0]["body"]["ip_address"] == "127.0.0.1"


def test_one_trusted_hop_uses_the_last_address(
    app_relay_factory: InProcessRelayFactory, sandbox: Sandbox
) -> None:
    relay = app_relay_factory(campaigns=SECURE_CAMPAIGNS, trusted_proxy_hops=1)  # ProxyFix: the app's
    t = txn()
    # The client forged the first entry; our one proxy appended the address it saw.
    assert (
        send(
            relay,
            {"event_id": "quote_viewed", "transaction_id": t},
            X_Forwarded_For="198.51.100.7, 203.0.113.9",
            X_Forwarded_Host="evil.example",
        ).status_code
        == 200
    )
    assert arrived(sandbox, t)[0]["body"]["ip_address"] == "203.0.113.9"


# --- no open proxy ---------------------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str]

    def _any(self) -> None:
        self.hits.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = do_OPTIONS = do_CONNECT = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def decoy() -> Iterator[tuple[str, list[str]]]:
    """An HTTP listener the relay must never connect to: (its host:port, the requests it got)."""
    hits: list[str] = []
    handler = type("Decoy", (_Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def raw_request(relay: Relay, head: str, body: bytes) -> bytes:
    """Send a hand-written request (absolute-form targets and odd paths httpx would normalise)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(
            head.replace("\n", "\r\n").encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_nothing_in_a_request_changes_the_upstream(
    secure: Relay, sandbox: Sandbox, decoy: tuple[str, list[str]]
) -> None:
    host, hits = decoy
    accepted: list[str] = []
    for headers in (
        {"Host": host},
        {"X-Forwarded-Host": host},
        {"Forwarded": f"host={host}"},
        {"X-Forwarded-Proto": "http", "X-Forwarded-Host": host, "X-Forwarded-Port": host.split(":")[1]},
        {"X-Original-URL": f"http://{host}/"},
        {"X-Rewrite-URL": f"http://{host}/"},
    ):
        t = txn()
        response = send(
            secure,
            {"event_id": "quote_viewed", "transaction_id": t},
            **{k.replace("-", "_"): v for k, v in headers.items()},
        )
        assert response.status_code == 200, (headers, response.text)
        accepted.append(t)
    for field in ("upstream_url", "url", "callback", "webhook", "host"):
        response = send(
            secure, {"event_id": "quote_viewed", "transaction_id": txn(), field: f"http://{host}/"}
        )
        assert response.status_code == 400 and field in response.json()["invalidFields"]
    # An absolute-form request line naming the decoy is served by the relay, forwarded to the sandbox.
    t = txn()
    body = f'{{"event_id":"quote_viewed","transaction_id":"{t}"}}'.encode()
    reply = raw_request(
        secure,
        f"POST http://{host}/api/event/cmp_test HTTP/1.1\nHost: {host}\nOrigin: {ORIGIN}\n"
        f"User-Agent: {BROWSER}\nContent-Type: application/json\nConnection: close\n",
        body,
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    accepted.append(t)
    for target in (
        "/api/event/..%2F..%2Fcmp_test",
        "/api/event/%2e%2e/cmp_test",
        f"/api/event/{host}",
        "/api/event/cmp_test%2F..%2F..%2F",
        "/api/event/http:%2F%2F" + host,
        "/api/event//" + host,
    ):
        reply = raw_request(
            secure,
            f"POST {target} HTTP/1.1\nHost: 127.0.0.1\nOrigin: {ORIGIN}\n"
            "Content-Type: application/json\nConnection: close\n",
            b'{"event_id":"quote_viewed","transaction_id":"t-path"}',
        )
        status = int(reply.split(b" ", 2)[1])
        assert 300 <= status < 500, (target, reply[:300])  # a 404, or werkzeug's own slash-merging redirect
    for t in accepted:
        [event] = arrived(sandbox, t)
        assert event["cid"] == "cmp_test"
    assert hits == []
    assert all("t-path" not in str(r["body"]) for r in sandbox.requests())


# --- body size, headers, errors -------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_413(secure: Relay, sandbox: Sandbox) -> None:
    big = b'{"event_id":"quote_viewed","transaction_id":"t","quote_id":"' + b"x" * 17000 + b'"}'
    response = send(secure, big)
    assert (response.status_code, response.json()["message"]) == (413, "Request body too large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds for a chunked upload too
        yield big[:8000]
        yield big[8000:]

    chunked = httpx.post(
        secure.url + "/api/event/cmp_test",
        content=chunks(),
        headers={"Origin": ORIGIN, "User-Agent": BROWSER, "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413
    assert sandbox.requests() == []


def test_nosniff_on_every_answer_and_csp_on_every_html_page(secure: Relay) -> None:
    url = secure.url
    answers = [
        httpx.get(url + "/healthz"),
        httpx.get(url + "/readyz"),
        httpx.get(url + "/openapi.json"),
        httpx.get(url + "/sdk/cmp_test.js"),
        httpx.get(url + "/sdk/nope.js"),
        httpx.get(url + "/nope"),
        httpx.get(url + "/api/event/cmp_test"),
        httpx.get(url + "/metrics"),
        httpx.get(url + "/admin/"),
        httpx.get(url + "/admin/login"),
        httpx.options(url + "/api/event/cmp_test", headers={"Origin": ORIGIN}),
        send(secure, {"event_id": "quote_viewed", "transaction_id": txn()}),
        send(secure, {"event_id": "nope", "transaction_id": "t"}),
        send(secure, b"x=1", Content_Type="application/x-www-form-urlencoded"),
        send(secure, {"event_id": "quote_viewed", "transaction_id": "t"}, origin="https://evil.example"),
    ]
    html = [r for r in answers if r.headers.get("content-type", "").startswith("text/html")]
    for response in answers:
        assert response.headers.get("X-Content-Type-Options") == "nosniff", (
            response.url,
            response.status_code,
        )
        assert "Traceback" not in response.text
    for response in html:
        csp = response.headers.get("Content-Security-Policy", "")
        assert "default-src" in csp and "frame-ancestors 'none'" in csp, (response.url, csp)
        assert "unsafe-eval" not in csp and "script-src *" not in csp


def test_internal_errors_are_generic(tmp_path: Path) -> None:
    config = parse_config(
        {
            "relay": {
                "upstream_url": "http://127.0.0.1:9",
                "store": f"sqlite:///{tmp_path / 'r.sqlite3'}",
                "rate_limits": {"per_ip": "", "per_campaign": ""},
            },
            "campaigns": {"c1": {"allowed_origins": [ORIGIN], "events": {"view": {}}}},
        }
    )
    app = create_app(config, start_delivery=False)
    relay = app.extensions["relay"]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire at /var/lib/secret/path")

    post = lambda: app.test_client().post(  # noqa: E731
        "/api/event/c1",
        json={"event_id": "view", "transaction_id": f"t-{uuid.uuid4()}"},
        headers={"Origin": ORIGIN, "User-Agent": BROWSER},
    )
    relay.accept = broken  # a bug on the accept path: a generic 500
    response = post()
    del relay.accept
    assert response.status_code == 500
    assert response.get_json() == {
        "status": 500,
        "type": "error",
        "message": "Internal error",
        "data": {},
        "missingFields": {},
        "invalidFields": {},
    }
    assert (
        "secret" not in response.get_data(as_text=True)
        and response.headers["X-Content-Type-Options"] == "nosniff"
    )
    relay.forwarder.send = broken  # a bug past the store: the event is stored, so 202, never a 500
    assert post().status_code == 202
    relay.store.add = broken  # the store itself failing: "retry later", still without internals
    response = post()
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "secret" not in response.get_data(as_text=True)
    relay.close()


# --- rate limits -------------------------------------------------------------------------------------------


def test_per_ip_limit_counts_exactly_and_keys_on_the_client(
    relay_factory: RelayFactory, sandbox: Sandbox
) -> None:
    # One worker: memory storage is per process (the Redis test below covers several workers).
    relay = relay_factory(
        campaigns=SECURE_CAMPAIGNS,
        workers=1,
        trusted_proxy_hops=1,
        rate_limits={"per_ip": "5/minute", "per_campaign": ""},
    )
    statuses = []
    for i in range(5):  # rejected requests count too: this limit is against one abusive client
        body = {"event_id": "quote_viewed" if i % 2 else "nope", "transaction_id": txn()}
        statuses.append(send(relay, body, X_Forwarded_For="203.0.113.1").status_code)
    assert statuses == [400, 200, 400, 200, 400]
    limited = send(
        relay, {"event_id": "quote_viewed", "transaction_id": txn()}, X_Forwarded_For="203.0.113.1"
    )
    assert limited.status_code == 429 and limited.json()["type"] == "error"
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert limited.headers["Access-Control-Allow-Origin"] == ORIGIN  # the page can read it and back off
    # Same socket address, another client behind the trusted proxy: its own bucket.
    assert (
        send(
            relay, {"event_id": "quote_viewed", "transaction_id": txn()}, X_Forwarded_For="203.0.113.2"
        ).status_code
        == 200
    )
    # Other surfaces are not limited.
    assert httpx.get(relay.url + "/healthz").status_code == 200
    assert httpx.get(relay.url + "/sdk/cmp_test.js").status_code == 200


def test_per_campaign_limit_counts_taken_in_events_only(
    relay_factory: RelayFactory, sandbox: Sandbox
) -> None:
    relay = relay_factory(
        campaigns=SECURE_CAMPAIGNS, workers=1, rate_limits={"per_ip": "", "per_campaign": "3/minute"}
    )
    for _ in range(4):  # strangers cannot spend a campaign's budget
        assert (
            send(
                relay, {"event_id": "quote_viewed", "transaction_id": txn()}, origin="https://evil.example"
            ).status_code
            == 403
        )
    ok = [
        send(relay, {"event_id": "quote_viewed", "transaction_id": txn()}),
        send(relay, {"event_id": "quote_viewed", "transaction_id": txn()}, path="/p/collect"),
        httpx.post(
            relay.url + "/api/event/trigger",
            headers={"Origin": ORIGIN, "User-Agent": BROWSER},
            json={"cid": "cmp_test", "event_id": "quote_viewed", "transaction_id": txn()},
        ),
    ]
    assert [r.status_code for r in ok] == [200, 200, 200]
    limited = httpx.post(
        relay.url + "/api/event/trigger",
        headers={"Origin": ORIGIN, "User-Agent": BROWSER},
        json={"cid": "cmp_test", "event_id": "quote_viewed", "transaction_id": txn()},
    )
    assert limited.status_code == 429 and "campaign" in limited.json()["message"]
    assert int(limited.headers["Retry-After"]) >= 1
    assert (
        send(
            relay,
            {"event_id": "signup", "transaction_id": txn()},
            path="/api/event/cmp_other",
            origin="https://other.example.org",
        ).status_code
        == 200
    )


@pytest.mark.redis
def test_redis_limits_are_shared_by_all_workers(relay_factory: RelayFactory, redis_url: str) -> None:
    relay = relay_factory(
        campaigns=SECURE_CAMPAIGNS,
        workers=2,
        store=redis_url,
        rate_limits={"per_ip": "4/minute", "per_campaign": ""},
    )
    statuses = [
        send(relay, {"event_id": "quote_viewed", "transaction_id": txn()}).status_code for _ in range(8)
    ]
    assert statuses == [200] * 4 + [429] * 4
