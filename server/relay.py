"""The relay's moving parts wired together, kept in ``app.extensions["relay"]``.

The accept path (``accept``) is: validate -> enrich -> store durably -> one bounded inline attempt
-> answer. Inline attempts are capped per process (``inline_concurrency``) and time-boxed
(``inline_timeout``): when Pingtree is slow, the few threads allowed to wait on it are busy and
every other request is answered 202 at once from the store, so a slow upstream costs latency
only to the requests that were going to get a conversion_id back anyway, never throughput.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .config import CampaignConfig, Config
from .enrichment import dedupe_key, forward_body
from .errors import ApiError, answer
from .forwarder import DUPLICATE_MESSAGE, Attempt, Decision, Forwarder
from .observe import Observers
from .outbox import Record, Store, open_store
from .outbox.dispatcher import Dispatcher
from .staging import StagingRouter, is_test, mark, staging_dedupe_key
from .validation import Event

log = logging.getLogger("pingtree_relay.relay")


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    outcome: str  # delivered, queued, dead, duplicate, replay: for metrics and logs


class Relay:
    """Owns the store, the forwarder and the dispatcher of one process."""

    def __init__(self, config: Config, *, store: Store | None = None, forwarder: Forwarder | None = None) -> None:
        settings = config.relay
        self.config = config
        self.observers = Observers()
        self.store = store or open_store(settings.store)
        self.forwarder = forwarder or Forwarder(
            settings.upstream_url, timeout=settings.upstream_timeout,
            max_connections=settings.delivery_concurrency + settings.inline_concurrency + 4,
        )
        # Test traffic (staging origins) is routed at send time, in one place: server/staging.py.
        self.staging_forwarder = (
            Forwarder(settings.staging_upstream_url, timeout=settings.upstream_timeout)
            if settings.staging_upstream_url else None
        )
        self.dispatcher = Dispatcher(
            self.store, StagingRouter(config, self.forwarder, self.staging_forwarder),
            concurrency=settings.delivery_concurrency,
            lease=settings.lease_seconds, max_age=settings.max_age_hours * 3600,
            retry_base=settings.retry_base_seconds, retry_cap=settings.retry_cap_seconds,
            observer=self._delivered,
        )
        self._inline = threading.BoundedSemaphore(max(1, settings.inline_concurrency))
        self._inline_enabled = settings.inline_concurrency > 0 and settings.inline_timeout > 0

    def _delivered(self, record: Record, attempt: Attempt, decision: Decision) -> None:
        self.observers.emit(
            "delivery", cid=record.cid, event_id=record.event_id, event_uuid=record.id,
            state=decision.state, status=attempt.status, latency_ms=attempt.latency_ms,
            attempts=record.attempts, reason=decision.reason or attempt.error or "",
            test=True if is_test(record.payload) else None,
        )

    def campaign(self, cid: str | None) -> CampaignConfig:
        campaign = self.config.campaigns.get(cid or "")
        if campaign is None:
            raise ApiError(404, "Campaign not found", reason="unknown_campaign")
        return campaign

    def accept(
        self, campaign: CampaignConfig, event: Event, *, idempotency_key: str | None,
        ip_address: str | None, user_agent: str | None, test: bool = False,
    ) -> Reply:
        """Store the event, try it once inline, and say what happened.

        ``test``: from one of the campaign's staging_origins; stored flagged, never sent to the real
        upstream (see server/staging.py), answered with ``"test": true`` in ``data``.
        """
        reply = self._accept(campaign, event, idempotency_key=idempotency_key, ip_address=ip_address,
                             user_agent=user_agent, test=test)
        if test:
            reply.body["data"]["test"] = True
        return reply

    def _accept(
        self, campaign: CampaignConfig, event: Event, *, idempotency_key: str | None,
        ip_address: str | None, user_agent: str | None, test: bool,
    ) -> Reply:
        self.dispatcher.start()
        received_at = time.time()
        payload = forward_body(campaign, event, received_at=received_at, ip_address=ip_address, user_agent=user_agent)
        record = Record(
            id=event.event_uuid or idempotency_key or uuid.uuid4().hex,
            cid=campaign.cid, event_id=event.event_id, transaction_id=event.transaction_id,
            payload=mark(payload) if test else payload,
            received_at=received_at, dedupe_key=staging_dedupe_key(dedupe_key(event)) if test else dedupe_key(event),
        )
        inline = self._inline_enabled and self._inline.acquire(blocking=False)
        owner = self.dispatcher.owner if inline else None
        try:
            stored, created = self.store.add(record, owner=owner, lease=self.config.relay.lease_seconds)
        except BaseException as exc:
            if inline:  # don't leak the slot, or inline attempts stop for good
                self._inline.release()
            if not isinstance(exc, Exception):
                raise
            # The store is down (Redis unreachable, disk full): the event is not ours yet, so say
            # "try again" (the SDK keeps it and retries after Retry-After) rather than 500.
            log.exception("could not store event %s", record.id)
            raise ApiError(503, "Temporarily unable to accept events; retry later",
                           headers={"Retry-After": "5"}, reason="store_unavailable") from exc
        if not created:
            if inline:
                self._inline.release()
            return self._existing(stored, record)
        if not inline:
            self.dispatcher.wake()
            return _queued(stored)
        try:
            attempt, decision = self.dispatcher.deliver(
                stored, owner=owner or "", timeout=self.config.relay.inline_timeout)
        finally:
            self._inline.release()
        if decision.state == "delivered":
            return Reply(200, _success(stored, attempt.answer), "delivered")
        if decision.state == "dead":
            return Reply(attempt.status or 502, _upstream_error(stored, attempt.answer, decision.reason), "dead")
        self.dispatcher.wake()
        return _queued(stored)

    def _existing(self, stored: Record, new: Record) -> Reply:
        """The answer for an event the relay already has: a replay (same event_uuid) or a collapse."""
        if stored.id != new.id:
            if stored.state == "delivered":
                body = answer(400, DUPLICATE_MESSAGE, data={"event_uuid": stored.id})
                return Reply(400, body, "duplicate")
            return Reply(202, answer(202, "Collapsed into an event already queued for this transaction_id",
                                     type="queued", data={"event_uuid": stored.id}), "collapsed")
        if stored.state == "delivered":
            return Reply(200, _success(stored, stored.last_answer), "replay")
        if stored.state == "dead":
            status = stored.last_status if stored.last_status and stored.last_status >= 400 else 502
            return Reply(status, _upstream_error(stored, stored.last_answer, stored.last_error or ""), "replay")
        return Reply(202, _queued(stored).body, "replay")

    def close(self) -> None:
        self.dispatcher.stop()
        self.forwarder.close()
        if self.staging_forwarder is not None:
            self.staging_forwarder.close()
        self.store.close()


def _queued(record: Record) -> Reply:
    body = answer(202, "Event accepted and queued for delivery", type="queued", data={"event_uuid": record.id})
    return Reply(202, body, "queued")


def _success(record: Record, upstream: dict[str, Any] | None) -> dict[str, Any]:
    upstream = upstream or {}
    data = dict(upstream.get("data") or {}) if isinstance(upstream.get("data"), dict) else {}
    data["event_uuid"] = record.id
    return answer(200, str(upstream.get("message") or "Event triggered successfully"), data=data)


def _upstream_error(record: Record, upstream: dict[str, Any] | None, reason: str) -> dict[str, Any]:
    upstream = upstream or {}
    status = upstream.get("status") if isinstance(upstream.get("status"), int) else 502
    body = answer(
        status, str(upstream.get("message") or reason or "Upstream rejected the event"),
        data={"event_uuid": record.id},
        missing=upstream.get("missingFields") if isinstance(upstream.get("missingFields"), dict) else None,
        invalid=upstream.get("invalidFields") if isinstance(upstream.get("invalidFields"), dict) else None,
    )
    return body
