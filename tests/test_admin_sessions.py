"""Dashboard login on both stores: server-side sessions that logout revokes, failed logins throttled
and logged, a hostile ``next`` refused.

In process (Flask's test client), each test once with the session records in the outbox's SQLite
file and once in the session's real ``redis-server``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from server import create_app
from server.admin import MAX_FAILED_LOGINS
from server.config import parse_config

pytest_plugins = ["tests.redis_fixture"]

TOKEN = "s3cret-admin-token"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def make_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    url = (
        request.getfixturevalue("redis_url")
        if request.param == "redis"
        else f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    )
    apps: list[Flask] = []

    def make(token: str = TOKEN) -> Flask:
        config = parse_config(
            {
                "relay": {
                    "upstream_url": "http://127.0.0.1:9",
                    "store": url,
                    "admin_token": token,
                    "secret_key": "a fixed signing key, so only the token changes",
                },
                "campaigns": {
                    "cmp_a": {"allowed_origins": ["https://shop.example.com"], "events": {"view": {}}}
                },
            }
        )
        app = create_app(config, start_delivery=False)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["relay"].close()


def csrf(client: FlaskClient, path: str = "/admin/login") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert match, f"no CSRF field on {path}"
    return match.group(1)


def login(client: FlaskClient, token: str = TOKEN, **environ: Any) -> Any:
    return client.post(
        "/admin/login", data={"token": token, "csrf_token": csrf(client)}, environ_base=environ or {}
    )


def session_cookie(response: Any) -> str:
    cookie = SimpleCookie()
    cookie.load(response.headers["Set-Cookie"])
    return cookie["pingtree_admin"].value


def test_logout_revokes_the_session_server_side(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    client = app.test_client()
    stolen = session_cookie(login(client))
    assert client.get("/admin/").status_code == 200
    client.post("/admin/logout", data={"csrf_token": csrf(client, "/admin/")})
    # The cookie as it was before logout (a copy someone kept) no longer opens anything.
    thief = app.test_client()
    thief.set_cookie("pingtree_admin", stolen, path="/admin")
    answer = thief.get("/admin/")
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/admin/login")


def test_sessions_are_random_not_derived_from_the_token(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    first, second = session_cookie(login(app.test_client())), session_cookie(login(app.test_client()))
    assert first.split(".")[0] != second.split(".")[0]  # two logins, two different sessions
    assert TOKEN not in first


def test_a_new_token_ends_every_session(make_app: Callable[..., Flask]) -> None:
    cookie = session_cookie(login(make_app().test_client()))
    rotated = make_app(token="a-brand-new-admin-token").test_client()
    rotated.set_cookie("pingtree_admin", cookie, path="/admin")
    assert rotated.get("/admin/").status_code == 302


def test_failed_logins_are_logged_then_throttled(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    attacker = app.test_client()
    with caplog.at_level(logging.WARNING, logger="pingtree_relay.admin"):
        for _ in range(MAX_FAILED_LOGINS):
            assert login(attacker, "wrong-token", REMOTE_ADDR="203.0.113.77").status_code == 401
        blocked = login(attacker, TOKEN, REMOTE_ADDR="203.0.113.77")  # even the right token, now
    assert blocked.status_code == 429 and "Too many failed logins" in blocked.text
    assert int(blocked.headers["Retry-After"]) > 0
    assert attacker.get("/admin/").status_code == 302
    failed = [r.getMessage() for r in caplog.records if "admin login failed" in r.getMessage()]
    assert len(failed) == MAX_FAILED_LOGINS and "203.0.113.0/24" in failed[0]
    assert not any("203.0.113.77" in r.getMessage() for r in caplog.records)  # never a full IP
    # Another client (another worker would see the same counts: they are in the store) is not blocked.
    assert login(app.test_client(), TOKEN, REMOTE_ADDR="198.51.100.5").status_code == 302


def test_the_failure_count_is_shared_by_every_worker(make_app: Callable[..., Flask]) -> None:
    one, two = make_app(), make_app()  # two apps on one store: two gunicorn workers
    for i in range(MAX_FAILED_LOGINS):
        app = one if i % 2 else two
        assert login(app.test_client(), "wrong-token", REMOTE_ADDR="203.0.113.9").status_code == 401
    assert login(one.test_client(), TOKEN, REMOTE_ADDR="203.0.113.9").status_code == 429


@pytest.mark.parametrize(
    "target", ["/admin/\r\nSet-Cookie: x=1", "/admin/%0d%0aX: 1", "/admin/\n", "/admin/\x00"]
)
def test_a_next_with_control_characters_is_400(make_app: Callable[..., Flask], target: str) -> None:
    client = make_app().test_client()
    from urllib.parse import unquote

    raw = unquote(target)
    assert client.get("/admin/login", query_string={"next": raw}).status_code == 400
    answer = client.post("/admin/login", data={"token": TOKEN, "csrf_token": csrf(client), "next": raw})
    assert answer.status_code == 400 and "control characters" in answer.text
