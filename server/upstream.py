"""Which Pingtree endpoint a stored event goes to: the campaign form, or the Global Event Postback API.

Almost every event goes to ``POST {upstream}/api/event/{cid}``. A postback source configured with
``global_org_id`` goes to ``POST {upstream}/api/event/global/{org-id}`` instead (Pingtree finds the
campaign from the transaction id). The choice is made once, when the event is accepted, and kept in
the stored payload under :data:`ROUTE_KEY`, so a delivery hours later (after an outage, or by
another worker) still goes where it was meant to; the key itself is never sent.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .fields import INTERNAL_PREFIX
from .validation import Event

ROUTE_KEY = f"{INTERNAL_PREFIX}global_org"  # not a Pingtree field name, and no caller can ever set it


def with_global_route(event: Event, org_id: str) -> Event:
    """``event`` marked for the Global Event Postback API of organisation ``org_id``."""
    return replace(event, fields={**event.fields, ROUTE_KEY: org_id})


def route(upstream_url: str, cid: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The URL to post ``payload`` to and the body to send (without the routing note)."""
    org_id = payload.get(ROUTE_KEY)
    if not isinstance(org_id, str) or not org_id:
        return f"{upstream_url}/api/event/{cid}", payload
    body = {k: v for k, v in payload.items() if k != ROUTE_KEY}
    return f"{upstream_url}/api/event/global/{org_id}", body
