"""The operator dashboard at ``/admin/``: campaigns, live feed, dead letters, events per minute.

Server-rendered Jinja pages with one small script (copy buttons, feed refresh), all served by this
blueprint so the strict Content-Security-Policy of the app holds (no inline script or style, no CDN).

Access: the admin token (``relay.admin_token`` or ``PINGTREE_RELAY_ADMIN_TOKEN``) is typed once on
the login page and compared in constant time; failed logins are logged (the client's network, never
its address) and, past ``MAX_FAILED_LOGINS`` from one client in ``LOGIN_WINDOW_SECONDS``, refused
with 429 until the window ends. A login opens a server-side session (:mod:`.sessions`): the cookie
holds a random session id, logout deletes its record, and changing the token ends every session.
The session cookie is ``HttpOnly``, ``SameSite=Strict``, scoped to ``/admin`` and ``Secure`` on
https. Every POST carries a per-session CSRF token. Without a token configured the dashboard does
not exist: every ``/admin/`` page answers 404 and says how to enable it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface

from ..relay import Relay, current_relay, relay_of
from .sessions import SessionStore, open_sessions

bp = Blueprint(
    "admin",
    __name__,
    url_prefix="/admin",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

SESSION_HOURS = 12
MAX_FAILED_LOGINS = 5  # per client and window: enough for typos, hopeless for guessing
LOGIN_WINDOW_SECONDS = 300
_OPEN_ENDPOINTS = frozenset({"admin.login", "admin.static"})


def admin_token() -> str:
    return str(current_relay().config.relay.admin_token or "")


def sessions() -> SessionStore:
    return current_app.extensions["admin_sessions"]  # type: ignore[no-any-return]


def logged_in() -> bool:
    """Per request, once: a session id in the cookie whose server-side record is live for this token."""
    if "admin_logged_in" not in g:
        token, sid = admin_token(), session.get("sid")
        g.admin_logged_in = bool(token) and isinstance(sid, str) and sessions().valid(sid, token)
    return bool(g.admin_logged_in)


def token_matches(candidate: str) -> bool:
    """Constant-time comparison of a typed token with the configured one."""
    token = admin_token()
    return bool(token) and hmac.compare_digest(candidate.encode(), token.encode())


def log_in() -> None:
    session.clear()  # a fresh session (and CSRF token) at the privilege change: no fixation
    session.permanent = True
    session["sid"] = sessions().open(admin_token(), SESSION_HOURS * 3600)
    g.admin_logged_in = True
    csrf_token()


def log_out() -> None:
    sid = session.get("sid")
    if isinstance(sid, str):
        sessions().revoke(sid)  # a copy of the cookie is worth nothing from now on
    session.clear()
    g.admin_logged_in = False


def login_blocked(client: str) -> bool:
    """True while ``client`` has used up its failed logins for this window."""
    return sessions().failures(client, LOGIN_WINDOW_SECONDS) >= MAX_FAILED_LOGINS


def count_failed_login(client: str) -> int:
    return sessions().count_failure(client, LOGIN_WINDOW_SECONDS)


def csrf_token() -> str:
    """This session's CSRF token, created on first use; templates put it in a hidden field."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def csrf_ok() -> bool:
    expected, sent = session.get("csrf"), request.form.get("csrf_token", "")
    return isinstance(expected, str) and hmac.compare_digest(expected.encode(), sent.encode())


@bp.before_request
def guard() -> Any:
    """Disabled without a token; pages redirect to login, POSTs are refused; POSTs need CSRF."""
    if request.endpoint == "admin.static":
        return None
    if not admin_token():
        return Response(render_template("admin/disabled.html"), status=404)
    if request.endpoint not in _OPEN_ENDPOINTS and not logged_in():
        if request.method != "GET":
            return Response("Log in first.\n", status=401, mimetype="text/plain")
        return redirect(url_for("admin.login", next=request.full_path if request.args else request.path))
    if request.method == "POST" and not csrf_ok():
        return Response(
            "CSRF token missing or wrong: reload the page and try again.\n", status=403, mimetype="text/plain"
        )
    return None


@bp.after_request
def no_store(response: Response) -> Response:
    if request.endpoint != "admin.static":
        response.headers["Cache-Control"] = "no-store"  # operator data must not sit in shared caches
    return response


@bp.app_context_processor
def template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "logged_in": logged_in}


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked ``Secure`` whenever the request came over https.

    Only the dashboard has a session (its cookie is scoped to ``/admin``): every other request,
    the event endpoint above all, skips building a signing serializer it would never use.
    """

    def open_session(self, app: Flask, request: Any) -> Any:
        if not request.path.startswith("/admin"):
            return self.make_null_session(app)
        return super().open_session(app, request)

    def save_session(self, app: Flask, session: Any, response: Any) -> None:
        if session.__class__ is not self.null_session_class:
            super().save_session(app, session, response)

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(super().get_cookie_secure(app) or (request and request.is_secure))


def _secret_key(app: Flask, relay: Relay) -> None:
    # Without relay.secret_key every worker would invent its own key and a session signed by one
    # worker would be refused by the next. Deriving it from the admin token keeps the workers in
    # agreement, and changing the token ends every session.
    if not relay.config.relay.secret_key and relay.config.relay.admin_token:
        app.config["SECRET_KEY"] = hmac.new(
            relay.config.relay.admin_token.encode(), b"pingtree-relay session key", hashlib.sha256
        ).digest()


def init_app(app: Flask) -> None:
    """Register the dashboard and make the session cookie fit for it."""
    from . import postbacks, views  # noqa: F401  (routes attach themselves to bp)

    relay_ = relay_of(app)
    _secret_key(app, relay_)
    app.extensions["admin_sessions"] = open_sessions(relay_.config.relay.store)
    app.config.update(
        SESSION_COOKIE_NAME="pingtree_admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PATH="/admin",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
    )
    app.session_interface = _SessionInterface()
    app.register_blueprint(bp)
