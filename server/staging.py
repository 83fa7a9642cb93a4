"""Test traffic: events from a campaign's ``staging_origins`` never reach the real Pingtree.

Marketers try pages on staging hosts first (``*.webflow.io``, ``localhost``, a preview domain).
Such an event is validated, stored and answered like any other, and flagged as test traffic at
every step: its stored payload carries :data:`TEST_FLAG` (so the dashboard, the metrics and the
logs can say so), its answer carries ``"test": true`` in ``data``, and its delivery goes through
:class:`StagingRouter`, the one gate between the outbox and the network: a flagged payload goes to
``relay.staging_upstream_url``, or, when that is empty (the default), nowhere: it is answered as
Pingtree's sandbox would answer. The flag is a key no Pingtree field can have (it starts with
``_`` and the browser cannot send it: validation refuses unknown fields), and it is stripped
before any upstream sees the body.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from .config import Config
from .errors import answer
from .fields import INTERNAL_PREFIX
from .forwarder import AsyncForwarder, Attempt

TEST_FLAG = f"{INTERNAL_PREFIX}test"  # in the stored payload only: no caller can ever set it
SANDBOX_SUCCESS = "Event triggered successfully"  # the sandbox's (and Pingtree's) message


class Sender(Protocol):
    """What the dispatcher needs of a forwarder."""

    def send(self, cid: str, body: dict[str, Any], *, timeout: float | None = None) -> Attempt: ...


def mark(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload to store for a test event."""
    return {**payload, TEST_FLAG: True}


def is_test(payload: dict[str, Any] | None) -> bool:
    return bool(payload and payload.get(TEST_FLAG))


def staging_dedupe_key(key: str | None) -> str | None:
    """A test event never collapses into a real one of the same transaction (nor the reverse)."""
    return None if key is None else "test|" + key


def sandbox_answer(config: Config, cid: str, body: dict[str, Any]) -> dict[str, Any]:
    """What Pingtree's sandbox answers for a valid event (server/sandbox/state.py), marked as a test."""
    campaign = config.campaigns.get(cid)
    event = campaign.events.get(str(body.get("event_id"))) if campaign else None
    conversion = bool(event and event.conversion)
    return answer(
        200,
        SANDBOX_SUCCESS,
        data={
            "cid": cid,
            "pid": body.get("pid") or "organic",
            "transaction_id": body.get("transaction_id"),
            "conversion_id": f"conv_test_{uuid.uuid4()}" if conversion else "",
            "conversion": conversion,
            "test": True,
        },
    )


class StagingRouter:
    """Sends real events through ``real``, test events through ``staging`` or nowhere."""

    def __init__(self, config: Config, real: Sender, staging: Sender | None) -> None:
        self.config = config
        self.real = real
        self.staging = staging

    def send(self, cid: str, body: dict[str, Any], *, timeout: float | None = None) -> Attempt:
        if not is_test(body):
            return self.real.send(cid, body, timeout=timeout)
        clean = {k: v for k, v in body.items() if k != TEST_FLAG}
        if self.staging is None:
            return Attempt(200, answer=sandbox_answer(self.config, cid, clean), latency_ms=0.0)
        return self.staging.send(cid, clean, timeout=timeout)


class AsyncStagingRouter:
    """The delivery engine's gate, the same rule as :class:`StagingRouter` for its async forwarders."""

    def __init__(self, config: Config, real: AsyncForwarder, staging: AsyncForwarder | None) -> None:
        self.config = config
        self.real = real
        self.staging = staging

    @property
    def last(self) -> tuple[float, bool, str] | None:
        """The real upstream's latest outcome (for /readyz): test traffic says nothing about Pingtree."""
        return self.real.last

    async def send(self, cid: str, body: dict[str, Any]) -> Attempt:
        if not is_test(body):
            return await self.real.send(cid, body)
        clean = {k: v for k, v in body.items() if k != TEST_FLAG}
        if self.staging is None:
            return Attempt(200, answer=sandbox_answer(self.config, cid, clean), latency_ms=0.0)
        return await self.staging.send(cid, clean)

    async def aclose(self) -> None:
        await self.real.aclose()
        if self.staging is not None:
            await self.staging.aclose()
