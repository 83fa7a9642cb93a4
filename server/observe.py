"""Decisions as events: the accept path and the dispatcher report what they decided, and whoever
cares (metrics, structured logs, the dashboard) subscribes. Keeps I/O for observability out of the
core and lets each observer be added by its own ``init_app``.

Kinds and their fields:

- ``received``: cid (may be None: unknown or missing).
- ``accepted``: cid, event_id, outcome (delivered, queued, dead, duplicate, collapsed, replay), status, event_uuid.
- ``rejected``: cid, event_id, reason (a short label), status.
- ``delivery``: cid, event_id, event_uuid, state (delivered, dead, retry), status (what Pingtree
  meant: :func:`server.forwarder.answered_status`), http_status (only when it differs), latency_ms,
  attempts, reason, inline.
- ``filtered``: cid, event_id, reason (e.g. bot): accepted with 202 but deliberately not forwarded.
- ``postback``: cid, source, event_id, outcome (an ``accepted`` outcome, or ``refused``), reason, status:
  one per postback request, beside its ``accepted`` or ``rejected``.
- ``sdk``: cid, version (a build's content hash, or ``unknown``), state (stable, current, superseded,
  unknown): a script request (see :mod:`server.sdk_versions`).

``accepted`` and ``delivery`` carry ``test=True`` for test traffic (a staging origin, server/staging.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pingtree_relay.observe")

Observer = Callable[[str, dict[str, Any]], None]


class Observers:
    """A tiny synchronous event bus. An observer that raises is logged, never breaks the caller."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []
        self._lock = threading.Lock()

    def add(self, observer: Observer) -> None:
        with self._lock:
            self._observers = [*self._observers, observer]

    def emit(self, kind: str, **fields: Any) -> None:
        for observer in self._observers:
            try:
                observer(kind, fields)
            except Exception:  # observability must never cost an event
                log.exception("observer failed on %s", kind)
