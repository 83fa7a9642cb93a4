"""The dashboard's pages. Thin: they read the store and the config, and hand plain rows to templates."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from flask import current_app, flash, jsonify, redirect, render_template, request, url_for
from werkzeug.wrappers import Response  # flask.Response is one; redirect() returns the base class

from ..errors import ApiError
from ..health import write_probe
from ..logs import mask_ip
from ..relay import current_relay
from ..sdk import snippet_tag, versions_seen
from ..sdk_archive import RETENTION_DAYS
from ..validation import validate_event
from . import (
    LOGIN_WINDOW_SECONDS,
    MAX_FAILED_LOGINS,
    bp,
    count_failed_login,
    log_in,
    log_out,
    login_blocked,
    token_matches,
)
from .chart import build_chart
from .present import DISPLAY_STATES, STORE_STATE, age, feed_row, masked_payload, matches_state

FEED_LIMIT = 100
log = logging.getLogger("pingtree_relay.admin")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """The token form. A wrong token answers 401 with the form again, and is logged; too many from
    one client answer 429 (even with the right token) until the window ends."""
    raw_next = request.values.get("next", "")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw_next):  # CR/LF would split the Location header
        return Response(
            "next: not a dashboard path (it holds control characters)\n", status=400, mimetype="text/plain"
        )
    target = _safe_next(raw_next)
    if request.method == "POST":
        client = request.remote_addr or "unknown"
        if login_blocked(client):
            log.warning("admin login refused from %s: too many failed logins", mask_ip(client))
            page = render_template(
                "admin/login.html",
                next=target,
                error=f"Too many failed logins; try again in {LOGIN_WINDOW_SECONDS // 60} minutes.",
            )
            return page, 429, {"Retry-After": str(LOGIN_WINDOW_SECONDS)}
        if token_matches(request.form.get("token", "")):
            log_in()
            return redirect(target)
        failures = count_failed_login(client)
        log.warning(
            "admin login failed from %s (%d of %d allowed in %d s)",
            mask_ip(client),
            failures,
            MAX_FAILED_LOGINS,
            LOGIN_WINDOW_SECONDS,
        )
        return render_template("admin/login.html", error="That token is not right.", next=target), 401
    return render_template("admin/login.html", error=None, next=target)


def _safe_next(target: str) -> str:
    # Only back into the dashboard: "next" must never send a logged-in operator to another site.
    if target.startswith("/admin/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("admin.overview")


@bp.post("/logout")
def logout() -> Response:
    log_out()
    return redirect(url_for("admin.login"))


@bp.get("/")
def overview() -> str:
    """Queue at a glance and the last hour, per minute, by outcome."""
    store = current_relay().store
    now = time.time()
    chart = build_chart(store.timeline(now - 3600), now)
    recent = [feed_row(r, now) for r in store.find(limit=10)]
    # The same cached write probe as /readyz: a full disk or a Redis refusing writes shows here too.
    write_error = write_probe(current_app).error()
    return render_template(
        "admin/overview.html",
        stats=store.stats(),
        chart=chart,
        recent=recent,
        write_error=write_error,
        persistence=store.persistence(),
        page="overview",
    )


@bp.get("/campaigns")
def campaigns() -> str:
    """Every campaign: its tag (and the pinned variant), script versions pages load, events, origins
    and a test-event form."""
    config = current_relay().config
    base = config.relay.public_url or request.host_url.rstrip("/")
    seen = versions_seen()
    now = time.time()
    items = [
        {
            "campaign": c,
            "snippet": _snippet(c.cid, base),
            "versions": [{**row, "age": age(now - row["last_seen"])} for row in seen.get(c.cid, [])],
        }
        for c in config.campaigns.values()
    ]
    return render_template(
        "admin/campaigns.html",
        items=items,
        page="campaigns",
        retention_days=RETENTION_DAYS,
        suggested_txn=f"test-{secrets.token_hex(4)}",
    )


def _snippet(cid: str, base: str) -> dict[str, str]:
    """The default tag (stable URL) and the pinned one (SRI, content-addressed URL)."""
    config = current_relay().config
    return {"html": snippet_tag(config, cid, base), "pinned": snippet_tag(config, cid, base, integrity=True)}


@bp.post("/campaigns/<cid>/test")
def send_test_event(cid: str) -> Response:
    """A test event through the real accept path: validated, stored, forwarded upstream."""
    rel = current_relay()
    rel.received(cid)
    campaign = rel.campaign(cid)
    body: dict[str, Any] = {
        "event_id": request.form.get("event_id", ""),
        "transaction_id": request.form.get("transaction_id", "").strip(),
    }
    for name in ("amount", "pid"):
        if request.form.get(name, "").strip():
            body[name] = request.form[name].strip()
    try:
        event = validate_event(campaign, body, revenue_key="amount", trusted=False)
    except ApiError as exc:
        rel.rejected(cid, None, reason=exc.reason, status=exc.status)
        flash(f"Not sent: {exc.status} {exc.message}", "error")
        return redirect(url_for("admin.campaigns") + f"#{cid}")
    reply = rel.accept(
        campaign,
        event,
        idempotency_key=None,
        ip_address=None,
        user_agent="pingtree-relay dashboard (test event)",
        inline=True,  # the campaign manager is here for Pingtree's verdict, whatever the event
    )
    flash(
        f"Test event {event.event_id} for {event.transaction_id}: {reply.outcome} "
        f"({reply.status} {reply.body.get('message', '')})",
        "ok" if reply.status < 400 else "error",
    )
    return redirect(url_for("admin.feed", transaction_id=event.transaction_id))


def _feed_filters() -> dict[str, str]:
    return {key: request.args.get(key, "").strip() for key in ("cid", "event_id", "state", "transaction_id")}


def _feed_rows(filters: dict[str, str]) -> list[dict[str, Any]]:
    wanted = filters["state"] if filters["state"] in DISPLAY_STATES else ""
    records = current_relay().store.find(
        state=STORE_STATE.get(wanted),
        cid=filters["cid"] or None,
        event_id=filters["event_id"] or None,
        transaction_id=filters["transaction_id"] or None,
        limit=FEED_LIMIT * (3 if wanted in ("queued", "delivering", "retrying") else 1),
    )
    now = time.time()
    return [feed_row(r, now) for r in records if matches_state(r, wanted, now)][:FEED_LIMIT]


@bp.get("/feed")
def feed() -> str:
    """The latest events, filterable; the table refreshes itself from ``feed.json``."""
    filters = _feed_filters()
    config = current_relay().config
    events = sorted({e for c in config.campaigns.values() for e in c.events})
    return render_template(
        "admin/feed.html",
        rows=_feed_rows(filters),
        filters=filters,
        page="feed",
        campaigns=list(config.campaigns),
        events=events,
        states=DISPLAY_STATES,
    )


@bp.get("/feed.json")
def feed_json() -> Response:
    """The feed as JSON (same filters as the page), for the page's refresh and for scripts."""
    return jsonify({"events": _feed_rows(_feed_filters()), "stats": current_relay().store.stats().to_dict()})


@bp.get("/dead")
def dead() -> str:
    """Dead letters: why each died, and the body it would send (IP cut to its network)."""
    rows = [
        {**feed_row(r), "reason": r.last_error or "", "payload": masked_payload(r.payload)}
        for r in current_relay().store.find(state="dead", limit=200)
    ]
    return render_template("admin/dead.html", rows=rows, page="dead")


@bp.post("/dead/requeue")
def requeue() -> Response:
    """Re-queue one dead letter (``id``) or all of them (``all``); delivery starts at once."""
    store = current_relay().store
    if request.form.get("all"):
        count = store.requeue(everything=True)
    else:
        count = store.requeue(ids=[i for i in request.form.getlist("id") if i])
    current_relay().dispatcher.wake()
    flash(f"Re-queued {count} dead letter{'s' if count != 1 else ''}.", "ok")
    return redirect(url_for("admin.dead"))
