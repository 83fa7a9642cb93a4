"""The relay's moving parts wired together, kept in ``app.extensions["relay"]``.

The accept path (``accept``) is: validate -> enrich -> store durably -> one bounded inline attempt
-> answer. Only an event whose caller waits for Pingtree's answer is tried inline
(``EventConfig.tried_inline``: conversions, whose answer carries the conversion_id, unless the
event's ``inline`` says otherwise; the dashboard's test events). Inline attempts are capped per
process (``inline_concurrency``), time-boxed (``inline_timeout``) and made only with capacity to
spare (:meth:`Relay._inline_worthwhile`): not while the delivery engine is behind
(``BACKLOG_EVENTS`` due and unclaimed), nor while this process is short of CPU
(``INLINE_CPU_BUSY`` of a core over the last ``CAPACITY_CHECK_SECONDS``, :mod:`server.cpu_load`),
nor on the worker's event loop thread (:func:`server.worker.may_wait`: such a request is one the
relay said it would not try, ``server.ThreadHint``). Otherwise every
request is answered 202 at once from the store and the engine delivers it, so a slow or saturated
Pingtree, or a burst, costs latency only to the requests that were going to get a conversion_id
back anyway, never accept throughput. Background delivery is the engine's
(:mod:`server.outbox.dispatcher`), in this process or in ``pingtree-relay deliver``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, cast

import httpx
from flask import Flask

from .config import CampaignConfig, Config
from .contexts import current_flask_app
from .cpu_load import CpuLoad
from .enrichment import dedupe_key, forward_body
from .errors import ApiError, answer
from .forwarder import DUPLICATE_MESSAGE, AsyncForwarder, Attempt, Decision, Forwarder, answered_status
from .observe import Observers
from .outbox import Record, Store, open_store, scoped_id
from .outbox.dispatcher import Dispatcher
from .staging import AsyncStagingRouter, StagingRouter, is_test, mark, staging_dedupe_key
from .validation import Event
from .worker import may_wait

log = logging.getLogger("pingtree_relay.relay")


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    outcome: str  # delivered, queued, dead, duplicate, replay: for metrics and logs
    # The body the relay stores for Pingtree (accept's replies): api.py reports its relay_fields from it.
    forwarded: dict[str, Any] | None = None


BACKLOG_EVENTS = 200  # due and unclaimed: ~0.2 s of traffic at 1,000/s means the engine is behind
CAPACITY_CHECK_SECONDS = 0.25  # how stale the accept path's view of backlog and CPU may be
# An inline attempt costs its request ~0.7 ms of CPU more than a 202 from the store (the request to
# Pingtree, its answer, a second write), about a third of the request. A process that ran Python
# for half of the last check interval is queueing requests behind each other (its GIL is one core):
# that CPU goes to accepting, and the engine delivers in batches for less (docs/durability.md).
INLINE_CPU_BUSY = 0.5


class InlineSlots:
    """How many inline attempts this process may still start (``relay.inline_concurrency``)."""

    def __init__(self, slots: int) -> None:
        self._lock = threading.Lock()
        self.free = slots

    def take(self) -> bool:
        with self._lock:
            if self.free <= 0:
                return False
            self.free -= 1
            return True

    def release(self) -> None:
        with self._lock:
            self.free += 1


def _inline_names(config: Config) -> dict[str | None, tuple[bytes, ...]]:
    """For :meth:`Relay.may_carry_inline`: per campaign, the quoted names (JSON, as bytes) of its
    events tried inline; under None, every campaign's (``POST /api/event/trigger``)."""
    names: dict[str | None, tuple[bytes, ...]] = {
        cid: tuple(json.dumps(name).encode() for name, event in c.events.items() if event.tried_inline)
        for cid, c in config.campaigns.items()
    }
    names[None] = tuple({name for quoted in names.values() for name in quoted})
    return names


class Relay:
    """Owns the store, the inline forwarder and the delivery engine of one process."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        forwarder: Forwarder | None = None,
        delivery_transport: httpx.AsyncBaseTransport | None = None,
        cpu_load: CpuLoad | None = None,
    ) -> None:
        """``forwarder`` (the inline attempt's) and ``delivery_transport`` (the engine's) let unit
        tests answer for Pingtree with ``httpx.MockTransport``. ``cpu_load``: a server's worker
        passes one, so that inline attempts stop while it is short of CPU (the module docstring); None in tests, where the process is busy with the test itself."""
        settings = config.relay
        self.config = config
        self._inline_names = _inline_names(config)
        self.observers = Observers()
        self.store = store or open_store(settings.store)
        self.forwarder = forwarder or Forwarder(  # the inline attempt's; the engine builds its own
            settings.upstream_url,
            timeout=settings.upstream_timeout,
            max_connections=settings.inline_concurrency + 2,
        )
        # Test traffic (staging origins) is routed at send time, in one place: server/staging.py.
        self.staging_forwarder = (
            Forwarder(settings.staging_upstream_url, timeout=settings.upstream_timeout)
            if settings.staging_upstream_url
            else None
        )
        self._inline_sender = StagingRouter(config, self.forwarder, self.staging_forwarder)
        self.dispatcher = Dispatcher(
            self.store,
            forwarder_factory=lambda connections: AsyncStagingRouter(
                config,
                AsyncForwarder(
                    settings.upstream_url,
                    timeout=settings.upstream_timeout,
                    max_connections=connections,
                    transport=delivery_transport,
                ),
                AsyncForwarder(
                    settings.staging_upstream_url,
                    timeout=settings.upstream_timeout,
                    max_connections=connections,
                    transport=delivery_transport,
                )
                if settings.staging_upstream_url
                else None,
            ),
            upstream_timeout=settings.upstream_timeout,
            lease=settings.lease_seconds,
            max_age=settings.max_age_hours * 3600,
            retry_base=settings.retry_base_seconds,
            retry_cap=settings.retry_cap_seconds,
            observer=self._delivered,
        )
        self._inline = InlineSlots(max(1, settings.inline_concurrency))
        self._inline_enabled = settings.inline_concurrency > 0 and settings.inline_timeout > 0
        self.cpu_load = cpu_load  # its first reading (at the first accept) starts its clocks
        self._checked_at = 0.0  # the first accept checks
        self._worthwhile = True

    def delivery_cap(self, inline_processes: int, engines: int = 1) -> int:
        """One engine's share of ``max_in_flight``: the box's cap less what ``inline_processes``
        processes may have in flight inline, split between the box's ``engines`` (serve's delivery
        processes), so engines plus inline never exceed the one knob."""
        inline = self.config.relay.inline_concurrency if self._inline_enabled else 0
        return max(1, (self.config.relay.max_in_flight - inline_processes * inline) // engines)

    def start_delivery(self) -> None:
        """Run the delivery engine in this process (one process serves and delivers)."""
        self.dispatcher.start(self.delivery_cap(1))

    def upstream_last(self) -> tuple[float, bool, str] | None:
        """The latest attempt upstream from this process, inline or engine: for /readyz."""
        seen = [
            last for last in (self.forwarder.last, getattr(self.dispatcher.forwarder, "last", None)) if last
        ]
        return max(seen) if seen else None

    def _delivered(self, record: Record, attempt: Attempt, decision: Decision, inline: bool) -> None:
        # What Pingtree meant (an HTTP 200 whose body says 400 is a 400), and the HTTP status beside
        # it when the two differ, so that a log line never shows a dead letter as "status 200".
        status = answered_status(attempt.status, attempt.answer)
        self.observers.emit(
            "delivery",
            cid=record.cid,
            event_id=record.event_id,
            event_uuid=record.event_uuid,
            state=decision.state,
            status=status,
            http_status=attempt.status if attempt.status != status else None,
            latency_ms=attempt.latency_ms,
            attempts=record.attempts,
            reason=decision.reason or attempt.error or "",
            inline=inline,
            test=True if is_test(record.payload) else None,
        )

    # --- what the accept path reports (the observers' vocabulary lives here, server/observe.py) -----

    def received(self, cid: object) -> None:
        """A request for an event arrived; ``cid`` becomes a label only when it is configured."""
        self.observers.emit(
            "received", cid=cid if isinstance(cid, str) and cid in self.config.campaigns else None
        )

    def rejected(self, cid: str | None, event_id: str | None, *, reason: str, status: int) -> None:
        """An event request was refused with ``status`` (``reason``: a short label)."""
        self.observers.emit("rejected", cid=cid, event_id=event_id, reason=reason, status=status)

    def filtered(self, cid: str, event_id: str, *, reason: str) -> None:
        """Answered 202 but deliberately not stored or forwarded (a known bot)."""
        self.observers.emit("filtered", cid=cid, event_id=event_id, reason=reason)

    def _accepted(self, cid: str, event_id: str, reply: Reply, *, test: bool) -> None:
        self.observers.emit(
            "accepted",
            cid=cid,
            event_id=event_id,
            outcome=reply.outcome,
            status=reply.status,
            event_uuid=reply.body["data"].get("event_uuid"),
            test=True if test else None,
        )

    def would_try_inline(self) -> bool:
        """Whether an event whose caller waits for Pingtree's answer (a conversion, by default),
        accepted now, would be tried inline: enabled, a slot free, capacity to spare
        (:meth:`_inline_worthwhile`)."""
        return self._inline_enabled and self._inline.free > 0 and self._inline_worthwhile()

    def may_carry_inline(self, cid: str | None, body: bytes | None) -> bool:
        """Whether a request for campaign ``cid`` (None: any, the trigger form) may carry an event
        tried inline (``EventConfig.tried_inline``): ``body`` is searched for such an event's quoted
        name, not parsed (None: not known, so yes if the campaign has one). A wrong yes costs a thread
        hop; a wrong no (a name written with JSON escapes) an answer of 202 where an inline attempt
        would have been made. For the worker's hint (``server.ThreadHint``)."""
        names = self._inline_names.get(cid, ())
        return bool(names) and (body is None or any(name in body for name in names))

    def _inline_worthwhile(self) -> bool:
        """True unless the engine has a backlog or this process is short of CPU: then an inline
        attempt would only take capacity from accepting (the module docstring).

        The backlog is read from the store, so it works whichever process runs the engine; both are
        refreshed at most every ``CAPACITY_CHECK_SECONDS`` per process (a racy refresh by two threads
        is harmless)."""
        now = time.monotonic()
        elapsed = now - self._checked_at
        if elapsed >= CAPACITY_CHECK_SECONDS:
            busy = self.cpu_load is not None and self.cpu_load.busy(INLINE_CPU_BUSY)
            self._checked_at = now
            try:
                behind = self.store.backlog(BACKLOG_EVENTS) >= BACKLOG_EVENTS
            except Exception:  # the add below reports a store that is down
                behind = True
            self._worthwhile = not (busy or behind)
        return self._worthwhile

    def campaign(self, cid: str | None) -> CampaignConfig:
        campaign = self.config.campaigns.get(cid or "")
        if campaign is None:
            raise ApiError(404, "Campaign not found", reason="unknown_campaign")
        return campaign

    def accept(
        self,
        campaign: CampaignConfig,
        event: Event,
        *,
        idempotency_key: str | None,
        ip_address: str | None,
        user_agent: str | None,
        test: bool = False,
        inline: bool | None = None,
    ) -> Reply:
        """Store the event, try it once inline, and say what happened.

        ``test``: from one of the campaign's staging_origins; stored flagged, never sent to the real
        upstream (see server/staging.py), answered with ``"test": true`` in ``data``. ``inline``:
        whether the caller waits for Pingtree's answer, capacity permitting; None: as the event's
        config says (``EventConfig.tried_inline``).
        """
        received_at = time.time()
        payload = forward_body(
            campaign, event, received_at=received_at, ip_address=ip_address, user_agent=user_agent
        )
        reply = replace(
            self._accept(
                campaign,
                event,
                payload,
                received_at=received_at,
                idempotency_key=idempotency_key,
                test=test,
                wants_answer=campaign.events[event.event_id].tried_inline if inline is None else inline,
            ),
            forwarded=payload,
        )
        if test:
            reply.body["data"]["test"] = True
        self._accepted(campaign.cid, event.event_id, reply, test=test)
        return reply

    def _accept(
        self,
        campaign: CampaignConfig,
        event: Event,
        payload: dict[str, Any],
        *,
        received_at: float,
        idempotency_key: str | None,
        test: bool,
        wants_answer: bool,
    ) -> Reply:
        """Store ``payload`` (the event's forward body), try it once inline if the caller
        ``wants_answer`` and there is capacity to spare, and say what happened."""
        record = Record(
            id=scoped_id(campaign.cid, event.event_uuid or idempotency_key or uuid.uuid4().hex),
            cid=campaign.cid,
            event_id=event.event_id,
            transaction_id=event.transaction_id,
            payload=mark(payload) if test else payload,
            received_at=received_at,
            dedupe_key=staging_dedupe_key(dedupe_key(event)) if test else dedupe_key(event),
            fingerprint=event.fingerprint(),
        )
        inline = wants_answer and self.would_try_inline() and may_wait() and self._inline.take()
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
            raise ApiError(
                503,
                "Temporarily unable to accept events; retry later",
                headers={"Retry-After": "5"},
                reason="store_unavailable",
            ) from exc
        if not created:
            if inline:
                self._inline.release()
            return self._existing(stored, record)
        if not inline:
            self.dispatcher.wake()
            return _queued(stored)
        try:
            try:
                attempt = self._inline_sender.send(
                    stored.cid, stored.payload, timeout=self.config.relay.inline_timeout
                )
            finally:
                self._inline.release()
            decision = self.dispatcher.settle(stored, attempt, owner=owner or "")
        except Exception:
            # The event is stored, and the attempt may have reached Pingtree before the write of its
            # outcome failed: a 500 would make the page resend what the outbox will deliver anyway.
            log.exception("outcome of the inline attempt for %s could not be stored", stored.id)
            self._mark_uncertain(stored, owner or "")
            return _queued(stored)
        if decision.state == "delivered":
            return Reply(200, _success(stored, attempt.answer), "delivered")
        if decision.state == "dead":
            status = _error_status(attempt.status, attempt.answer)
            return Reply(status, _upstream_error(stored, status, attempt.answer, decision.reason), "dead")
        self.dispatcher.wake()
        return _queued(stored)

    def _mark_uncertain(self, stored: Record, owner: str) -> None:
        """Best effort: the next attempt goes out as uncertain (a "Duplicate event" then means it
        got there). Should this write fail too, the lease stays set and its expiry does the same."""
        try:
            self.store.finish(
                stored.id,
                owner,
                state="pending",
                next_at=time.time() + self.config.relay.retry_base_seconds,
                status=None,
                answer=None,
                error="outcome of the inline attempt unknown (store write failed)",
                uncertain=True,
                latency_ms=None,
            )
        except Exception:
            log.exception("could not mark %s uncertain; its lease expiry will", stored.id)
        self.dispatcher.wake()

    def _existing(self, stored: Record, new: Record) -> Reply:
        """The answer for an event the relay already has: a replay (same event_uuid) or a collapse."""
        if stored.id != new.id and stored.event_uuid != new.event_uuid:
            if stored.state == "delivered":
                body = answer(400, DUPLICATE_MESSAGE, data={"event_uuid": stored.event_uuid})
                return Reply(400, body, "duplicate")
            return Reply(
                202,
                answer(
                    202,
                    "Collapsed into an event already queued for this transaction_id",
                    type="queued",
                    data={"event_uuid": stored.event_uuid},
                ),
                "collapsed",
            )
        if stored.fingerprint and stored.fingerprint != new.fingerprint:
            # Stripe's rule for a reused idempotency key: same request or an error, never a replay.
            raise ApiError(
                422,
                "event_uuid (or Idempotency-Key) already used for a different event; "
                "a new event needs a new one",
                invalid={"event_uuid": "already used with a different body"},
                reason="reused_event_uuid",
            )
        if stored.state == "delivered":
            return Reply(200, _success(stored, stored.last_answer), "replay")
        if stored.state == "dead":
            status = _error_status(stored.last_status, stored.last_answer)
            return Reply(
                status, _upstream_error(stored, status, stored.last_answer, stored.last_error or ""), "replay"
            )
        return Reply(202, _queued(stored).body, "replay")

    def close(self) -> None:
        self.dispatcher.stop()
        self.forwarder.close()
        if self.staging_forwarder is not None:
            self.staging_forwarder.close()
        self.store.close()


def _queued(record: Record) -> Reply:
    body = answer(
        202, "Event accepted and queued for delivery", type="queued", data={"event_uuid": record.event_uuid}
    )
    return Reply(202, body, "queued")


def _success(record: Record, upstream: dict[str, Any] | None) -> dict[str, Any]:
    upstream = upstream or {}
    data = dict(upstream.get("data") or {}) if isinstance(upstream.get("data"), dict) else {}
    data["event_uuid"] = record.event_uuid
    return answer(200, str(upstream.get("message") or "Event triggered successfully"), data=data)


def _error_status(status: int | None, answer: dict[str, Any] | None) -> int:
    """The status a page is told for a dead letter: what Pingtree meant (a 200 whose body says 400
    is a 400), or 502 when that was no error status (no answer, or a redirect given up on)."""
    said = answered_status(status, answer)
    return said if said is not None and said >= 400 else 502


def _upstream_error(
    record: Record, status: int, upstream: dict[str, Any] | None, reason: str
) -> dict[str, Any]:
    upstream = upstream or {}
    body = answer(
        status,
        str(upstream.get("message") or reason or "Upstream rejected the event"),
        data={"event_uuid": record.event_uuid},
        missing=upstream.get("missingFields") if isinstance(upstream.get("missingFields"), dict) else None,
        invalid=upstream.get("invalidFields") if isinstance(upstream.get("invalidFields"), dict) else None,
    )
    return body


def relay_of(app: Flask) -> Relay:
    """The app's relay: ``create_app`` keeps it in ``app.extensions["relay"]``."""
    return cast(Relay, app.extensions["relay"])


def current_relay() -> Relay:
    """The relay of the app serving the current request."""
    return relay_of(current_flask_app())
