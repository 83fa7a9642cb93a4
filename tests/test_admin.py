"""The dashboard in process: access control, CSRF, test events, dead letters, feed, chart.

The upstream is an ``httpx.MockTransport`` that records what it was sent; the browser tests in
``tests/browser/test_dashboard.py`` cover the same paths against real processes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

from server import create_app
from server.admin.chart import MINUTES, build_chart, nice_ceiling
from server.admin.present import age, masked_payload
from server.config import parse_config
from server.forwarder import Forwarder
from server.relay import Relay
from tests.conftest import wait_for

TOKEN = "s3cret-admin-token"
ORIGIN = {"Origin": "https://shop.example.com"}


class Upstream:
    """A fake Pingtree: answers from a queue (default 200) and keeps every body it got."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, str]] = []
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        import json

        self.bodies.append(json.loads(request.content))
        status, message = self.answers.pop(0) if self.answers else (200, "Event triggered successfully")
        return httpx.Response(status, json={"status": status, "message": message, "data": {}})


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def make_app(tmp_path: Path, upstream: Upstream) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(*, deliver: bool = False, **relay_keys: Any) -> Flask:
        """``deliver``: run the delivery engine in this process too (its Pingtree is ``upstream``)."""
        relay_keys.setdefault("admin_token", TOKEN)
        config = parse_config(
            {
                "relay": {
                    "upstream_url": "http://pingtree.invalid",
                    "retry_base_seconds": 0.05,
                    "store": f"sqlite:///{tmp_path / f'o{len(apps)}.sqlite3'}",
                    **relay_keys,
                },
                "campaigns": {
                    "cmp_a": {
                        "allowed_origins": ["https://shop.example.com"],
                        "events": {"view": {"inline": True}, "sale": {"conversion": True}, "visit": {}},
                    }
                },
            }
        )
        relay = Relay(
            config,
            forwarder=Forwarder(config.relay.upstream_url, transport=httpx.MockTransport(upstream)),
            delivery_transport=httpx.MockTransport(upstream),
        )
        app = create_app(config, relay=relay, start_delivery=deliver)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["relay"].close()


def csrf(client: FlaskClient, path: str = "/admin/login") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert match, f"no CSRF field on {path}"
    return match.group(1)


def logged_in(app: Flask) -> FlaskClient:
    client = app.test_client()
    response = client.post("/admin/login", data={"token": TOKEN, "csrf_token": csrf(client)})
    assert response.status_code == 302
    return client


def test_disabled_without_token(make_app: Callable[..., Flask]) -> None:
    client = make_app(admin_token="").test_client()
    for path in ("/admin/", "/admin/login", "/admin/feed.json"):
        answer = client.get(path)
        assert answer.status_code == 404
    assert "PINGTREE_RELAY_ADMIN_TOKEN" in client.get("/admin/").text
    assert client.post("/admin/login", data={"token": ""}).status_code == 404


def test_everything_refuses_without_login(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    for path in ("/admin/", "/admin/campaigns", "/admin/feed", "/admin/dead", "/admin/feed.json"):
        answer = client.get(path)
        assert answer.status_code == 302 and answer.headers["Location"].startswith("/admin/login"), path
    for path in ("/admin/dead/requeue", "/admin/campaigns/cmp_a/test", "/admin/logout"):
        assert client.post(path, data={"all": "1"}).status_code == 401, path


def test_login(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    client = app.test_client()
    token = csrf(client)
    wrong = client.post("/admin/login", data={"token": TOKEN + "x", "csrf_token": token})
    assert wrong.status_code == 401 and "not right" in wrong.text
    assert client.get("/admin/").status_code == 302
    assert client.post("/admin/login", data={"token": TOKEN}).status_code == 403  # no CSRF token
    right = client.post(
        "/admin/login", data={"token": TOKEN, "csrf_token": token, "next": "https://evil.example.net/"}
    )
    assert right.status_code == 302 and right.headers["Location"] == "/admin/"  # never off-site
    cookie = right.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie
    assert client.get("/admin/").status_code == 200
    client.post("/admin/logout", data={"csrf_token": csrf(client, "/admin/")})
    assert client.get("/admin/").status_code == 302


def test_cookie_is_secure_over_https(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    page = client.get("/admin/login", base_url="https://relay.example.com").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    answer = client.post(
        "/admin/login", base_url="https://relay.example.com", data={"token": TOKEN, "csrf_token": token}
    )
    assert "Secure" in answer.headers["Set-Cookie"]


def test_pages_are_csp_clean(make_app: Callable[..., Flask]) -> None:
    """No inline script or style anywhere: the app's CSP (script-src/style-src 'self') holds."""
    client = logged_in(make_app())
    for path in ("/admin/", "/admin/campaigns", "/admin/feed", "/admin/dead"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text), path
        assert "<style" not in page.text and " style=" not in page.text and "onclick" not in page.text, path
    with client.get("/admin/static/admin.js") as script:  # a file response: closed, or its file leaks
        assert script.status_code == 200


def test_campaigns_page_shows_the_script_versions_pages_load(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    client = logged_in(app)
    page = client.get("/admin/campaigns").text
    pinned = re.search(r"/sdk/cmp_a/v/([0-9a-f]{16})\.js", page)
    assert pinned
    for url in (
        "/sdk/cmp_a.js",
        "/sdk/cmp_a.js",
        "/sdk/cmp_a.js",
        f"/sdk/cmp_a/v/{pinned.group(1)}.js",
        "/sdk/cmp_a/v/0123456789abcdef.js",
    ):
        assert client.get(url).status_code == 200
    page = client.get("/admin/campaigns").text
    rows = {
        state: re.sub(r"<[^>]+>", " ", row)
        for state, row in re.findall(r'<tr data-state="(\w+)">(.*?)</tr>', page, re.S)
    }
    assert set(rows) == {"stable", "current", "unknown"}, rows
    assert pinned.group(1) in rows["stable"] and " 3 " in rows["stable"] and "default tag" in rows["stable"]
    assert " 1 " in rows["current"] and "pinned, current" in rows["current"]
    assert "unknown or expired: events lost" in rows["unknown"] and " 1 " in rows["unknown"]
    assert "s ago" in rows["unknown"]


def test_campaigns_page_and_test_event(make_app: Callable[..., Flask], upstream: Upstream) -> None:
    app = make_app()
    client = logged_in(app)
    page = client.get("/admin/campaigns").text
    assert "cmp_a" in page and "https://shop.example.com" in page and "conversion" in page
    # The default tag is the stable URL without integrity; the pinned variant is offered beside it.
    default, pinned = re.findall(
        r'<textarea class="snippet" id="(?:snippet|pinned)-cmp_a"[^>]*>(.*?)</textarea>', page, re.S
    )
    assert "/sdk/cmp_a.js&#34;&gt;&lt;/script&gt;" in default and "integrity" not in default
    assert re.search(r"/sdk/cmp_a/v/[0-9a-f]{16}\.js&#34; integrity=&#34;sha384-", pinned), pinned
    assert "No page has loaded this campaign's script yet." in page
    sent = client.post(
        "/admin/campaigns/cmp_a/test",
        data={
            "csrf_token": csrf(client, "/admin/campaigns"),
            "event_id": "sale",
            "transaction_id": "t-dash-1",
            "amount": "12.50",
        },
    )
    assert sent.status_code == 302 and "transaction_id=t-dash-1" in sent.headers["Location"]
    assert upstream.bodies[-1]["transaction_id"] == "t-dash-1" and upstream.bodies[-1]["amount"] == 12.5
    record = app.extensions["relay"].store.find(transaction_id="t-dash-1")[0]
    assert record.state == "delivered"
    feed = client.get(sent.headers["Location"]).text
    assert "t-dash-1" in feed and 'class="state delivered"' in feed


def test_a_test_event_waits_for_pingtree_even_for_an_event_not_tried_inline(
    make_app: Callable[..., Flask], upstream: Upstream
) -> None:
    """A page's plain event is answered 202 at once; the dashboard's test event is Pingtree's verdict."""
    app = make_app()
    client = logged_in(app)
    data = {"csrf_token": csrf(client, "/admin/campaigns"), "event_id": "visit", "transaction_id": "t-dash-2"}
    sent = client.post("/admin/campaigns/cmp_a/test", data=data)
    assert sent.status_code == 302
    assert app.extensions["relay"].store.find(transaction_id="t-dash-2")[0].state == "delivered"
    assert "visit for t-dash-2: delivered (200" in client.get(sent.headers["Location"]).text
    page = app.test_client().post(
        "/api/event/cmp_a",
        json={"event_id": "visit", "transaction_id": "t-page-2"},
        headers={"Origin": "https://shop.example.com"},
    )
    assert page.status_code == 202, page.text


def test_test_event_is_validated(make_app: Callable[..., Flask], upstream: Upstream) -> None:
    client = logged_in(make_app())
    answer = client.post(
        "/admin/campaigns/cmp_a/test",
        follow_redirects=True,
        data={"csrf_token": csrf(client, "/admin/campaigns"), "event_id": "sale", "transaction_id": "t-2"},
    )
    assert "Not sent: 400 amount is required for conversion events" in answer.text
    assert upstream.bodies == []


def test_dead_letters_masked_and_requeued(make_app: Callable[..., Flask], upstream: Upstream) -> None:
    app = make_app(deliver=True)
    upstream.answers.append((400, "Invalid pid"))
    visitor = app.test_client()
    dead = visitor.post(
        "/api/event/cmp_a",
        json={"event_id": "view", "transaction_id": "t-dead"},
        headers=ORIGIN,
        environ_base={"REMOTE_ADDR": "198.51.100.23"},
    )
    assert dead.status_code == 400
    client = logged_in(app)
    page = client.get("/admin/dead").text
    assert "Invalid pid" in page and "t-dead" in page
    assert "198.51.100.0/24" in page and "198.51.100.23" not in page
    record_id = "cmp_a:" + dead.json["data"]["event_uuid"]  # the store's id: scoped to the campaign
    requeued = client.post(
        "/admin/dead/requeue",
        follow_redirects=True,
        data={"csrf_token": csrf(client, "/admin/dead"), "id": record_id},
    )
    assert "Re-queued 1 dead letter." in requeued.text
    store = app.extensions["relay"].store
    wait_for(lambda: store.get(record_id).state == "delivered", timeout=10, message="re-queued delivery")
    assert (
        client.get("/admin/feed.json", query_string={"state": "delivered"}).json["events"][0]["id"]
        == record_id
    )


def test_requeue_all(make_app: Callable[..., Flask], upstream: Upstream) -> None:
    app = make_app()
    upstream.answers.extend([(400, "No"), (400, "No")])
    for txn in ("t-1", "t-2"):
        app.test_client().post(
            "/api/event/cmp_a", json={"event_id": "view", "transaction_id": txn}, headers=ORIGIN
        )
    client = logged_in(app)
    assert client.post("/admin/dead/requeue", data={"all": "1"}).status_code == 403  # no CSRF token
    answer = client.post(
        "/admin/dead/requeue",
        follow_redirects=True,
        data={"csrf_token": csrf(client, "/admin/dead"), "all": "1"},
    )
    assert "Re-queued 2 dead letters." in answer.text


def test_feed_filters(make_app: Callable[..., Flask], upstream: Upstream) -> None:
    app = make_app()
    upstream.answers.append((400, "No"))
    visitor = app.test_client()
    for txn in ("t-dead", "t-ok-1", "t-ok-2"):
        visitor.post("/api/event/cmp_a", json={"event_id": "view", "transaction_id": txn}, headers=ORIGIN)
    client = logged_in(app)

    def txns(**query: str) -> list[str]:
        return [
            e["transaction_id"] for e in client.get("/admin/feed.json", query_string=query).json["events"]
        ]

    assert txns() == ["t-ok-2", "t-ok-1", "t-dead"]
    assert txns(state="dead") == ["t-dead"]
    assert txns(state="delivered") == ["t-ok-2", "t-ok-1"]
    assert txns(transaction_id="t-ok-1") == ["t-ok-1"]
    assert txns(cid="cmp_a", event_id="sale") == []
    event = client.get("/admin/feed.json", query_string={"transaction_id": "t-dead"}).json["events"][0]
    assert (event["state"], event["attempts"], event["status"], event["message"]) == ("dead", 1, 400, "No")
    assert isinstance(event["latency_ms"], int)


def test_chart_geometry() -> None:
    now = 1_700_000_000.0
    minute = int(now // 60) * 60
    rows = [
        (minute, "delivered", 7),
        (minute, "dead", 3),
        (minute - 600, "queued", 2),
        (minute - 7200, "delivered", 99),
    ]  # two hours ago: outside the chart
    chart = build_chart(rows, now)
    assert chart.totals == {"delivered": 7, "queued": 2, "retrying": 0, "dead": 3}
    assert [b.outcome for b in chart.bars] == ["queued", "delivered", "dead"]
    assert chart.y_ticks[-1].label == "10"  # 10 in the busiest minute
    delivered, dead = chart.bars[1], chart.bars[2]
    assert delivered.x == dead.x and dead.y + dead.height == pytest.approx(delivered.y)
    assert delivered.height == pytest.approx(7 / 3 * dead.height)
    assert chart.bars[0].x < delivered.x and len(chart.x_ticks) == MINUTES // 15 + 1


@pytest.mark.parametrize("value, ceiling", [(0, 1), (1, 1), (3, 5), (10, 10), (11, 20), (260, 500)])
def test_nice_ceiling(value: int, ceiling: int) -> None:
    assert nice_ceiling(value) == ceiling


def test_presenting() -> None:
    assert masked_payload({"ip_address": "2001:db8:1:2::9", "sub1": "x"}) == {
        "ip_address": "2001:db8:1::/48",
        "sub1": "x",
    }
    assert [age(s) for s in (5, 125, 7300, 200000)] == ["5s", "2m", "2h", "2d"]


@pytest.mark.parametrize(
    "tz, zone_text", [("UTC", "UTC"), ("Europe/Paris", "UTC+01:00"), ("America/New_York", "UTC-05:00")]
)
def test_dashboard_times_carry_their_zone(monkeypatch: pytest.MonkeyPatch, tz: str, zone_text: str) -> None:
    """Times on the dashboard say whose clock they are on: the server's zone, as an offset."""
    import time as time_module

    from server.admin.present import clock, feed_row, iso_time
    from server.outbox import Record

    monkeypatch.setenv("TZ", tz)
    time_module.tzset()
    try:
        winter = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC: no daylight saving anywhere above
        assert clock(winter).endswith(" " + zone_text) and len(clock(winter).split()[0]) == 8
        assert iso_time(winter)[-6:] == ("+00:00" if zone_text == "UTC" else zone_text[3:])
        row = feed_row(
            Record(id="r", cid="c", event_id="e", transaction_id="t", payload={}, received_at=winter)
        )
        assert row["received"] == clock(winter)
        chart = build_chart([], winter)
        assert chart.x_ticks[0].label.endswith(" " + zone_text)
    finally:
        monkeypatch.delenv("TZ")
        time_module.tzset()


def test_an_answer_with_a_lone_surrogate_is_shown_not_a_500(make_app: Callable[..., Flask]) -> None:
    # "\ud800" in Pingtree's JSON decodes to a lone surrogate, which no UTF-8 encoder takes: the
    # dashboard's pages were a 500 while such an answer was among the latest. The answer is made
    # plain as it arrives (the forwarder), and as it is shown (stored by an older release: below).
    app = make_app()
    store = app.extensions["relay"].store
    client = app.test_client()
    accepted = client.post(
        "/api/event/cmp_a", headers=ORIGIN, json={"event_id": "visit", "transaction_id": "t-s"}
    )
    record_id = "cmp_a:" + accepted.json["data"]["event_uuid"]
    assert [r.id for r in store.claim("old-release", 10, 30)] == [record_id]
    store.finish(
        record_id,
        "old-release",
        state="dead",
        next_at=0,
        status=400,
        answer={"status": 400, "message": "Invalid pid \ud800"},
        error="400 Invalid pid ?",
        uncertain=False,
        latency_ms=None,
    )
    assert store.get(record_id).last_answer["message"] == "Invalid pid \ud800"  # as an old release kept it
    admin = logged_in(app)
    for path in ("/admin/", "/admin/feed", "/admin/dead", "/admin/feed.json"):
        page = admin.get(path)
        assert page.status_code == 200, path
        assert "Invalid pid" in page.text, path
