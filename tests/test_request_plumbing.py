"""The accept path's plumbing, cut down for CPU: each must do exactly what the werkzeug or Flask
call it replaces did (server/headers.py, server/contexts.py, the worker's whole body, the app's
JSON encoder, the route cache).

In process: the app factory and Flask's test client, a real SQLite store.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, g, jsonify, request, url_for
from flask.ctx import RequestContext
from flask.json.provider import DefaultJSONProvider
from werkzeug.datastructures import Headers
from werkzeug.exceptions import SecurityError
from werkzeug.local import LocalProxy

import server
from server import create_app
from server.config import parse_config
from server.contexts import current_flask_app, current_g, current_request
from server.headers import add_missing, request_header, set_headers
from server.routes import AdapterCache, RelayRequestContext, RouteCache
from server.worker import WHOLE_BODY

ORIGIN = "https://www.example.com"
LIMIT = 2048


def _make_app(tmp_path: Path, **relay_keys: Any) -> Flask:
    config = parse_config(
        {
            "relay": {
                "upstream_url": "http://127.0.0.1:9",
                "store": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
                "max_body_bytes": LIMIT,
                "rate_limits": {"per_ip": "", "per_campaign": ""},
                **relay_keys,
            },
            "campaigns": {"cmp_test": {"allowed_origins": [ORIGIN], "events": {"quote_viewed": {}}}},
        }
    )
    return create_app(config, start_delivery=False)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = _make_app(tmp_path)
    yield app
    app.extensions["relay"].close()


def _event(transaction_id: str, size: int | None = None) -> bytes:
    body = json.dumps({"event_id": "quote_viewed", "transaction_id": transaction_id}).encode()
    return body if size is None else body + b" " * (size - len(body))  # JSON may end in spaces


def _post(app: Flask, *, stream: bytes, whole: bytes | None) -> Any:
    """POST to the event endpoint as the relay's worker would: ``whole`` under WHOLE_BODY (None: as
    another WSGI server, the stream alone)."""
    overrides: dict[str, Any] = {"wsgi.input": io.BytesIO(stream)}
    if whole is not None:
        overrides[WHOLE_BODY] = whole
    return app.test_client().post(
        "/api/event/cmp_test",
        data=stream,
        headers={"Origin": ORIGIN, "Content-Type": "text/plain"},
        environ_overrides=overrides,
    )


# --- the body the worker read whole ---------------------------------------------------------------


def test_the_event_view_takes_the_body_the_worker_read_whole(app: Flask) -> None:
    body = _event("t-whole")
    # The stream is empty: only the whole body can have given the event.
    response = _post(app, stream=b"", whole=body)
    assert response.status_code == 202, response.get_json()


@pytest.mark.parametrize("whole", [True, False], ids=["whole-body", "stream"])
def test_the_body_limit_holds_alike_for_a_whole_body_and_a_stream(app: Flask, whole: bool) -> None:
    for size, status in ((LIMIT, 202), (LIMIT + 1, 413)):
        body = _event(f"t-{size}-{whole}", size)
        response = _post(app, stream=body, whole=body if whole else None)
        assert response.status_code == status, (size, response.get_json())
        if status == 413:
            assert response.get_json()["message"] == "Request body too large"


def test_the_campaign_limit_reads_the_trigger_forms_body_as_the_view_does(tmp_path: Path) -> None:
    # The limiter finds /api/event/trigger's campaign in the body: through the view's own reader,
    # so from the worker's whole body (here the stream is empty, as a consumed one would be).
    limited = _make_app(tmp_path, rate_limits={"per_ip": "", "per_campaign": "1/minute"})
    try:
        answers = []
        for n in range(2):
            body = json.dumps({"cid": "cmp_test", "event_id": "quote_viewed", "transaction_id": f"t-lim-{n}"})
            answers.append(
                limited.test_client()
                .post(
                    "/api/event/trigger",
                    data=b"",
                    headers={"Origin": ORIGIN, "Content-Type": "text/plain"},
                    environ_overrides={"wsgi.input": io.BytesIO(b""), WHOLE_BODY: body.encode()},
                )
                .status_code
            )
        assert answers == [202, 429]
    finally:
        limited.extensions["relay"].close()


# --- request headers ------------------------------------------------------------------------------


def test_request_header_reads_what_werkzeug_reads() -> None:
    app = Flask("plumbing")
    names = ["Origin", "User-Agent", "X-Server-Key", "Authorization", "Idempotency-Key", "X-Request-Id"]
    sent = {"Origin": ORIGIN, "User-Agent": "Mozilla/5.0 (é)", "X-Request-Id": ""}
    with app.test_request_context("/", headers=sent):
        for name in names:
            assert request_header(name) == request.headers.get(name), name
            assert request_header(name.lower()) == request.headers.get(name.lower()), name
        assert request_header("X-Server-Key") is None and request_header("X-Request-Id") == ""


# --- response headers set in one pass -------------------------------------------------------------


def _werkzeug(method: str, start: list[tuple[str, str]], values: dict[str, str]) -> list[tuple[str, str]]:
    headers = Headers(start)
    for name, value in values.items():
        getattr(headers, method)(name, value)
    return list(headers.items())


@pytest.mark.parametrize(
    "start",
    [
        [],
        [("Content-Type", "application/json"), ("Content-Length", "12")],
        [("Content-Type", "text/html"), ("vary", "Accept-Encoding"), ("Vary", "Cookie")],
        [("X-Content-Type-Options", "sniff"), ("Referrer-Policy", "no-referrer")],
    ],
    ids=["empty", "absent", "present-twice", "some-present"],
)
def test_set_headers_and_add_missing_do_what_set_and_setdefault_do(start: list[tuple[str, str]]) -> None:
    values = {"Vary": "Origin", "X-Content-Type-Options": "nosniff", "Access-Control-Allow-Origin": ORIGIN}
    headers = Headers(start)
    set_headers(headers, values)
    assert list(headers.items()) == _werkzeug("set", start, values)
    headers = Headers(start)
    add_missing(headers, values)
    assert list(headers.items()) == _werkzeug("setdefault", start, values)


def test_a_header_value_with_a_newline_is_still_refused() -> None:
    with pytest.raises(ValueError):
        set_headers(Headers(), {"X-Test": "a\r\nSet-Cookie: x=1"})


# --- the app's JSON -------------------------------------------------------------------------------

ANSWERS: list[Any] = [
    {
        "status": 202,
        "type": "queued",
        "message": "Event accepted",
        "data": {"event_uuid": "u", "b": [1, 2.5]},
    },
    {"é": "ü", "z": None, "a": True},
    [1, "two", {"three": 3}],
]


def test_the_apps_json_is_flasks_byte_for_byte(app: Flask) -> None:
    plain = Flask("plain")
    plain.json = DefaultJSONProvider(plain)
    for sort_keys in (False, True):  # a setting changed after the first answer is honoured
        app.json.sort_keys = plain.json.sort_keys = sort_keys  # type: ignore[attr-defined]
        for obj in ANSWERS:
            with app.app_context():
                ours = jsonify(obj).get_data()
            with plain.app_context():
                theirs = jsonify(obj).get_data()
            assert ours == theirs
            assert app.json.dumps(obj, indent=2) == plain.json.dumps(obj, indent=2)


# --- routes remembered ----------------------------------------------------------------------------

PATHS = [
    ("POST", "/api/event/cmp_test"),
    ("POST", "/api/event/trigger"),
    ("OPTIONS", "/api/event/cmp_test"),
    ("GET", "/api/event/cmp_test"),  # 405
    ("POST", "/api/event/cmp_test/"),  # 404 or a redirect: werkzeug's answer either way
    ("GET", "/sdk/cmp_test.js"),
    ("GET", "/admin"),  # strict slashes: a redirect to /admin/
    ("GET", "/nope"),
    ("POST", "/postback/cmp_test/ringba"),
]


def _matched(app: Flask, context: Any, method: str, path: str) -> tuple[Any, ...]:
    with app.test_request_context(path, method=method) as ctx:
        replica = context(app, ctx.request.environ)
        replica.match_request()
        request_ = replica.request
        error = request_.routing_exception
        return (request_.url_rule, request_.view_args, type(error), getattr(error, "new_url", None))


def test_a_request_is_routed_through_the_cache_as_werkzeug_routes_it(app: Flask) -> None:
    for _ in range(2):  # the second time from the cache
        for method, path in PATHS:
            ours = _matched(app, RelayRequestContext, method, path)
            assert ours == _matched(app, RequestContext, method, path), (method, path)
    routes = app.extensions["routes"]
    assert routes.matched[("/api/event/cmp_test", "POST", False)] is not None
    assert routes.matched[("/nope", "GET", False)] is None


def test_the_cache_hands_each_caller_its_own_arguments(app: Flask) -> None:
    routes = app.extensions["routes"]
    rule, args = routes.match("/api/event/cmp_test", "post")
    args["cid"] = "changed"
    assert routes.match("/api/event/cmp_test", "POST") == (rule, {"cid": "cmp_test"})


def test_the_cache_refuses_a_map_that_matches_hosts() -> None:
    app = Flask("hosts", host_matching=True, static_host="example.com")
    with pytest.raises(ValueError):
        RouteCache(app)


def _bound(app: Flask, path: str, host: str = "relay.example.com", **kwargs: Any) -> tuple[Any, str, str]:
    """The adapter a request context got, its request's host and a URL built for it."""
    with app.test_request_context(path, base_url=f"https://{host}", **kwargs) as ctx:
        return ctx.url_adapter, ctx.request.host, url_for("health.healthz", _external=True)


def test_requests_alike_share_one_url_adapter_as_flask_would_bind_it(app: Flask) -> None:
    first, host, url = _bound(app, "/api/event/cmp_test", method="POST")
    again, host_again, url_again = _bound(app, "/api/event/cmp_test", method="POST")
    assert again is first and (host_again, url_again) == (host, url) == (
        "relay.example.com", "https://relay.example.com/healthz",
    )  # fmt: skip
    other, other_host, other_url = _bound(app, "/api/event/cmp_test", host="other.example.com", method="POST")
    assert other is not first and (other_host, other_url) == (
        "other.example.com", "https://other.example.com/healthz",
    )  # fmt: skip
    environ = {**_environ(app, "/x?a=1"), "HTTP_HOST": "h"}
    flasks = Flask.create_url_adapter(app, app.request_class(environ))
    app.create_url_adapter(app.request_class(environ))
    kept = app.create_url_adapter(app.request_class(environ))  # from the cache
    assert vars(kept) == vars(flasks)  # what binding gives, field by field


def _environ(app: Flask, path: str) -> dict[str, Any]:
    with app.test_request_context(path) as ctx:
        return dict(ctx.request.environ)


def test_an_adapter_is_kept_only_for_a_short_request_and_not_for_a_refused_host(app: Flask) -> None:
    cache = app._adapters  # type: ignore[attr-defined]
    kept = len(cache.bound)
    _bound(app, "/sdk/cmp_test.js?" + "x" * 600)  # a client of random query strings: not kept
    assert len(cache.bound) == kept
    _bound(app, "/sdk/cmp_test.js?v=1")
    assert len(cache.bound) == kept + 1
    calls: list[str] = []

    def refuses(request: Any) -> Any:
        calls.append(request.path)
        raise SecurityError("host not trusted")

    untrusted, fresh = app.request_class(_environ(app, "/healthz")), AdapterCache()
    for _ in range(2):  # asked again each time: a refusal is not kept
        with pytest.raises(SecurityError):
            fresh.adapter(untrusted, refuses)
    assert fresh.bound == {}
    assert calls == ["/healthz", "/healthz"]


# --- the objects behind Flask's proxies -----------------------------------------------------------


def test_the_context_accessors_give_what_the_proxies_stand_for(app: Flask) -> None:
    with app.test_request_context("/api/event/cmp_test", method="POST"):
        assert current_request() is request._get_current_object()  # type: ignore[attr-defined]
        assert current_flask_app() is current_app._get_current_object()  # type: ignore[attr-defined]
        assert current_g() is g._get_current_object()  # type: ignore[attr-defined]
        assert current_request().path == "/api/event/cmp_test"
    for accessor in (current_request, current_flask_app, current_g):
        with pytest.raises(RuntimeError, match="outside of"):  # as the proxy itself, outside a context
            accessor()


class _RecordingLookup:
    """Stands in for ``LocalProxy.__getattr__`` (werkzeug's _ProxyLookup): Python calls it only
    once a name was not found on the proxy itself, the costly case. Records who looked up what."""

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup
        self.callers: list[tuple[str, str]] = []  # (file, function)

    def __get__(self, proxy: Any, owner: Any = None) -> Any:
        caller = sys._getframe(1).f_code
        self.callers.append((caller.co_filename, caller.co_name))
        return self.lookup.__get__(proxy, owner)


def test_an_accepted_event_looks_nothing_up_through_a_proxy(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each lookup through a proxy cost about 0.8 us (server/contexts.py): the relay's own code on
    # the accept path takes the objects themselves. Flask's own code keeps its few.
    recording = _RecordingLookup(LocalProxy.__dict__["__getattr__"])
    monkeypatch.setattr(LocalProxy, "__getattr__", recording)
    response = _post(app, stream=b"", whole=_event("t-proxies"))
    monkeypatch.undo()
    assert response.status_code == 202, response.get_json()
    assert recording.callers, "the recorder saw no lookup at all: it no longer stands in for them"
    package = Path(server.__file__).resolve().parent  # wherever it is imported from
    assert [c for c in recording.callers if Path(c[0]).resolve().is_relative_to(package)] == []
