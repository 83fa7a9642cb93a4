"""The sandbox's home page and health check.

The page is for people developing a landing page against the sandbox: which campaigns and events
exist, and what arrived lately (rejected requests too, with Pingtree's message, since "why was my
event refused?" is the usual question). Server-rendered, no script, no external assets. The template
lives here as a string so it ships with the Python package without any package-data entry; every
link goes through ``url_for`` so the page works when the sandbox is mounted under ``/sandbox``.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, render_template_string, url_for

from server.sandbox.state import SandboxState

bp = Blueprint("sandbox_page", __name__)

LATEST = 50

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Pingtree sandbox</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; }
  table { border-collapse: collapse; margin: 1rem 0; }
  th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
  code { background: #f3f3f3; padding: 0 .2rem; }
  .ok { color: #17662b; } .bad { color: #a3141c; }
</style>
</head>
<body>
<h1>Pingtree sandbox</h1>
<p>An emulator of Pingtree's Event Postback API. Send
<code>POST {{ base }}/api/event/&lt;campaign-id&gt;</code> (revenue as <code>amount</code>) or
<code>POST {{ base }}/api/event/trigger</code> (<code>cid</code> in the body, revenue as <code>revenue</code>)
with a JSON body holding <code>event_id</code> and <code>transaction_id</code>; answers, errors, the
2-second lock and deduplication follow Pingtree's documentation. Inspect what arrived with
<a href="{{ url_for('sandbox_control.events') }}">events</a>,
<a href="{{ url_for('sandbox_control.requests') }}">requests</a> and
<a href="{{ url_for('sandbox_control.stats') }}">stats</a>.</p>

<h2>Campaigns</h2>
<table>
<tr><th>cid</th><th>events</th><th>inactive sources</th></tr>
{% for c in campaigns %}
<tr><td><code>{{ c.cid }}</code></td>
<td>{% for e in c.events.values() %}<code>{{ e.name }}</code>{% if e.conversion %} (conversion){% endif %}
{% if e.allow_duplicates %} (repeatable){% endif %}{% if not loop.last %}, {% endif %}{% endfor %}</td>
<td>{{ c.inactive_sources|sort|join(", ") }}</td></tr>
{% else %}
<tr><td colspan="3">No campaigns configured.</td></tr>
{% endfor %}
</table>

<h2>Latest requests</h2>
<table>
<tr><th>received (UTC)</th><th>path</th><th>event_id</th><th>transaction_id</th><th>pid</th><th>answer</th></tr>
{% for r in latest %}
{% set body = r.body if r.body is mapping else {} %}
<tr><td>{{ r.received_at }}</td><td><code>{{ r.path }}</code></td>
<td>{{ body.event_id }}</td><td>{{ body.transaction_id }}</td><td>{{ body.pid }}</td>
<td class="{{ 'ok' if r.status == 200 else 'bad' }}">{% if r.status is none %}connection dropped (fault)
{% else %}{{ r.status }} {{ r.answer.message }}{% endif %}</td></tr>
{% else %}
<tr><td colspan="6">Nothing received yet.</td></tr>
{% endfor %}
</table>
</body>
</html>
"""


@bp.get("/")
def index() -> str:
    state: SandboxState = current_app.extensions["sandbox"]
    return render_template_string(
        _TEMPLATE,
        # The mount prefix ("" or "/sandbox"), so the documented paths shown are the real ones.
        base=url_for("sandbox_page.index").rstrip("/"),
        campaigns=sorted(state.campaigns.values(), key=lambda c: c.cid),
        latest=state.latest_requests(LATEST),
    )


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")
