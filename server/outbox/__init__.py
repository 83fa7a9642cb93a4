"""The outbox: every accepted event is stored here before the relay answers, then delivered.

A store is a small interface (:class:`Store`) with interchangeable backends (SQLite for one box,
Redis for several), checked by one contract test run against each. Delivery is
claim -> deliver -> finish: a claimed event carries a lease, and a worker that dies mid-delivery
leaves it to be claimed again when the lease expires (nothing is deleted on dequeue).

States: ``pending`` (waiting, or leased to a worker while ``lease_owner`` is set and ``next_at``
is in the future), ``delivered`` and ``dead`` (with ``last_error`` as the reason).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args

State = Literal["pending", "delivered", "dead"]  # what the store keeps; "retry" is pending, due later
STATES: tuple[State, ...] = get_args(State)


@dataclass
class Record:
    """One event in the outbox, with the exact body to forward (``payload``)."""

    id: str  # the store key: scoped_id(cid, the client's event_uuid or Idempotency-Key)
    cid: str
    event_id: str
    transaction_id: str
    payload: dict[str, Any]
    received_at: float
    dedupe_key: str | None = None
    fingerprint: str | None = None  # Event.fingerprint(): a reused id must come with the same event
    state: State = "pending"
    attempts: int = 0
    next_at: float = 0.0
    lease_owner: str | None = None
    uncertain: bool = False  # an earlier attempt may have reached Pingtree unseen
    last_status: int | None = None
    last_answer: dict[str, Any] | None = None
    last_error: str | None = None
    updated_at: float = field(default_factory=time.time)
    delivered_at: float | None = None
    latency_ms: float | None = None
    # When an operator last requeued it from the dead letters: max_age_hours counts from here then.
    requeued_at: float | None = None

    @property
    def event_uuid(self) -> str:
        """The client's id, as answers give it back (records stored before ids were scoped: the id)."""
        prefix = self.cid + ":"
        return self.id[len(prefix) :] if self.id.startswith(prefix) else self.id

    def display_state(self, now: float | None = None) -> str:
        """What an operator wants to see: queued, delivering, retrying, delivered or dead."""
        if self.state != "pending":
            return self.state
        now = time.time() if now is None else now
        if self.lease_owner and self.next_at > now:
            return "delivering"
        return "retrying" if self.attempts else "queued"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A stored payload's JSON: compact, one encoder for every event (json.dumps given any argument
# builds a new encoder per call).
_PAYLOAD_JSON = json.JSONEncoder(separators=(",", ":"))


def payload_json(payload: Mapping[str, Any]) -> str:
    """The JSON a store keeps of an event's forward body (both backends: one format)."""
    return _PAYLOAD_JSON.encode(payload)


def scoped_id(cid: str, event_uuid: str) -> str:
    """The store key of a client's id: one per campaign, so an id that campaign B's page sends can
    neither read campaign A's stored answer nor pass for A's event. (Records stored before this
    carry the bare event_uuid; ``add`` still finds those for their own campaign.)"""
    return f"{cid}:{event_uuid}"


@dataclass(frozen=True)
class Outcome:
    """One attempt's result as the store records it (``Store.finish_many``): ``state`` is a stored
    state (a classifier's "retry" is ``pending`` with ``next_at`` in the future)."""

    record_id: str
    owner: str
    state: State
    next_at: float
    status: int | None = None
    answer: dict[str, Any] | None = None
    error: str | None = None
    uncertain: bool = False
    latency_ms: float | None = None
    # The record's attempt count when this attempt's lease was taken (None: not checked). A lease is
    # one process's (its owner id), but one process may claim a record again once its lease ran out
    # (a store outage kept an outcome from being stored in time); the count tells that later lease
    # from the one this outcome belongs to, so a late outcome cannot drop a send still in flight.
    attempts: int | None = None

    def __post_init__(self) -> None:
        # Checked here, once for every backend: no store can be handed a state it does not keep.
        if self.state not in STATES:  # e.g. a Decision's "retry" must be stored as "pending"
            raise ValueError(f"unknown state {self.state!r}; expected one of {', '.join(STATES)}")


@dataclass(frozen=True)
class Stats:
    counts: dict[str, int]
    oldest_pending_age: float  # seconds; 0 when nothing is pending

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "oldest_pending_age": round(self.oldest_pending_age, 3)}


@dataclass(frozen=True)
class Persistence:
    """Whether what the store holds survives a restart of the store itself (not of the relay)."""

    state: str  # "ok", "snapshots" (may lose the last minutes), "off" or "unknown" (cannot be verified)
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"state": self.state, "detail": self.detail}


class Store(Protocol):
    """What the relay needs of a durable queue. Every method is safe across threads and processes.

    A backend subclasses it to inherit what is written once for all in terms of the rest (``finish``).
    """

    def add(self, record: Record, *, owner: str | None, lease: float) -> tuple[Record, bool]:
        """Insert ``record``; leased to ``owner`` for ``lease`` seconds when owner is given (the inline
        attempt). Returns ``(stored, created)``: when ``record.id`` (or, stored before ids were
        scoped, ``record.event_uuid`` with the same ``cid``) or a live record with the same
        ``dedupe_key`` exists, nothing is inserted and the existing record comes back."""

    def claim(self, owner: str, limit: int, lease: float) -> list[Record]:
        """Lease up to ``limit`` due pending records (including ones whose lease expired)."""

    def finish(
        self,
        record_id: str,
        owner: str,
        *,
        state: State,
        next_at: float,
        status: int | None,
        answer: dict[str, Any] | None,
        error: str | None,
        uncertain: bool,
        latency_ms: float | None,
    ) -> bool:
        """Record an attempt's outcome and drop the lease; False when ``owner`` no longer holds it."""
        return self.finish_many(
            [Outcome(record_id, owner, state, next_at, status, answer, error, uncertain, latency_ms)]
        )[0]

    def finish_many(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """``finish`` for a batch, in one transaction (SQLite) or one round trip (Redis) per batch;
        one flag per outcome, in order. The delivery engine settles everything through this."""

    def backlog(self, limit: int) -> int:
        """How many pending records are due and unleased (waiting for the delivery engine), counted
        up to ``limit``: cheap (an index range), for the accept path's "is the engine behind?"."""

    def release(self, record_ids: Iterable[str], owner: str) -> int:
        """Give leased records back unattempted (shutdown), claimable at once."""

    def get(self, record_id: str) -> Record | None: ...

    def find(
        self,
        *,
        state: State | None = None,
        cid: str | None = None,
        event_id: str | None = None,
        transaction_id: str | None = None,
        limit: int = 50,
    ) -> list[Record]:
        """Newest first."""

    def stats(self) -> Stats: ...

    def requeue(self, *, ids: Iterable[str] = (), cid: str | None = None, everything: bool = False) -> int:
        """Dead letters back to pending, due now. Returns how many."""

    def purge(self, *, state: str, older_than: float = 0.0) -> int:
        """Delete ``delivered`` or ``dead`` records last updated more than ``older_than`` seconds ago."""

    def timeline(self, since: float) -> list[tuple[int, str, int]]:
        """``(minute_start, display outcome, count)`` of events received since ``since``."""

    def maintain(self) -> None:
        """Upkeep that must not cost the accept path: the delivery engine calls it every
        ``MAINTAIN_SECONDS`` from a store thread of its own (SQLite: WAL checkpoints). Nothing by
        default."""
        return None

    def journal_bytes(self) -> int | None:
        """The size of the store's own write-ahead journal on disk (SQLite: the WAL file), for
        /metrics; None where there is none to watch."""
        return None

    def ping(self) -> bool: ...

    def check_writable(self) -> str | None:
        """Make one small real write: None when it was taken, else why not (a full disk, Redis OOM).

        Readiness must mean "can take an event": a store that still answers reads (``ping``) while
        refusing every write would keep a load balancer sending traffic that all gets 503."""

    def persistence(self) -> Persistence:
        """Whether the store's own restart keeps queued events (Redis without AOF or RDB loses them)."""

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    """A store from its URL: ``sqlite:///PATH`` or ``redis://HOST:PORT/DB``."""
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :])
    if url.startswith("redis://"):
        from .redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"unsupported store URL: {url!r}")
