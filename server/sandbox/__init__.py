"""The Pingtree sandbox: a faithful in-memory emulator of Pingtree's documented Event Postback API.

The relay forwards to it in the demo and in every test, and users develop their pages against it.
``create_sandbox_app(config, lock_seconds=2.0)`` builds the Flask app; the campaigns, their events
(``conversion``, ``allow_duplicates``) and ``inactive_sources`` come from ``config.campaigns``. It
also works mounted under a prefix (the demo serves it at ``/sandbox``). Run it alone with
``python -m server.sandbox --config FILE --port PORT`` (one process on an asyncio loop, where a
delay fault is a timer: see :mod:`server.sandbox.loop_server`).

Emulated API (answers always ``{"status","type","message","data","missingFields","invalidFields"}``):

- ``POST /api/event/{campaign-id}`` -- revenue field ``amount``.
- ``POST /api/event/trigger`` -- ``cid`` in the body, revenue field ``revenue`` (``amount`` accepted).
- ``POST /api/event/global/{org-id}`` -- the Global Event Postback API: no cid; the campaign is the one
  of the lead named by ``transaction_id`` (a lead exists once an event for it was accepted), else
  404 "Lead Not Found"; then the campaign form's rules. Any org id is accepted.

Rules, in the order applied (see :mod:`server.sandbox.rules`): body not a JSON object ->
400 "Invalid JSON body"; 400 "cid is required" / "Invalid cid"; 400 "event_id is required";
400 "transaction_id is required"; 400 "Invalid event_id for this campaign"; 403 "Source Inactive";
400 "Invalid <field>" for conversion_date, conversion_timezone, cost_operation, cost, adSpend,
min_price; conversion events: 400 "revenue is required for conversion events" / "Invalid revenue".
Then event processing (:mod:`server.sandbox.state`): 403 "Concurrent event in progress" within
``lock_seconds`` of the previous request for the same (cid, transaction_id, event_id) that reached
processing; 400 "Duplicate event for this transaction_id" unless the event allows duplicates;
otherwise 200 "Event triggered successfully" with data ``cid, pid, transaction_id, conversion_id,
conversion`` (``pid`` defaults to "organic"; conversion events get ``conversion_id = "conv_<uuid4>"``).

Control API (JSON):

- ``GET /_sandbox/events?cid=&event_id=&transaction_id=`` -> ``{"events": [{"id", "received_at",
  "cid", "event_id", "transaction_id", "body", "answer"}, ...]}``: accepted (200) events, oldest first,
  ``body`` exactly as received.
- ``GET /_sandbox/requests`` -> ``{"requests": [...]}``: every event request, with ``received_at``,
  ``method``, ``path``, ``headers`` (lowercase names; authorization/cookie redacted), ``body``,
  ``accepted``, ``fault``, ``status`` (null when dropped), ``answer``, ``duration_ms``.
- ``GET /_sandbox/stats`` -> counts: ``requests, accepted, conversions, rejected, faults_applied,
  dropped, by_status, by_message, active_locks, held`` (``held``: answers a delay fault is holding back now).
- ``POST /_sandbox/reset`` -> clears records, locks, fired events and faults (not ``lock_seconds``).
- ``GET|POST|DELETE /_sandbox/faults`` -> show, replace, clear the fault queue. ``POST`` takes one
  fault, a list, or ``{"faults": [...]}``; each event request consumes the head of the queue. A fault:
  ``status`` (answer it, Pingtree-shaped, with optional ``message``), ``delay_ms`` (hold the answer back),
  ``drop: true`` (close the TCP connection with no HTTP answer), ``when: "before"|"after"`` (the
  event is not processed / is processed, then misbehave), ``count`` (requests it applies to; absent or
  null = until cleared). E.g. ``{"status": 500, "count": 3}``, ``{"delay_ms": 1500, "when": "after"}``,
  ``{"drop": true, "when": "after"}``. Faults apply to the event endpoints only.
- ``GET|POST /_sandbox/config`` -> ``{"lock_seconds": 2.0}``; POST ``{"lock_seconds": 0.5}`` sets it.

Also ``GET /`` (an HTML page: campaigns and the latest requests) and ``GET /healthz``.
"""

from server.sandbox.api import ConnectionDropped
from server.sandbox.app import create_sandbox_app
from server.sandbox.state import SandboxState

__all__ = ["ConnectionDropped", "SandboxState", "create_sandbox_app"]
