"""``pingtree-relay outbox move``: events from one store into another, e.g. SQLite -> Redis.

The move of a running box, without losing queued events: restart the relay on the new store first
(from then on new events go there and nothing delivers from the old one), then move what the old
store still holds. Pending events are copied with their ids, so an event the new store already has
(a browser's retry arrived meanwhile) is not copied twice, and are then deleted from the old store so
that a relay pointed at it again cannot send them a second time. Running it twice moves nothing
more. Delivered and dead events (history) are copied only when asked and stay in the old file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .outbox import Record, Store

_MOVER = "outbox-move"  # the lease owner while a history record is written in its final state


class StoreInUse(RuntimeError):
    """The old store has events being delivered right now: a relay still uses it."""


@dataclass
class MoveReport:
    moved: int = 0  # pending events now in the new store, deleted from the old one
    already_there: int = 0  # pending events the new store had already (same id or same lead/event)
    history: int = 0  # delivered and dead events copied

    def summary(self) -> str:
        return (
            f"moved {self.moved} pending events ({self.already_there} were in the new store already); "
            f"copied {self.history} delivered or dead events"
        )


def move_events(source: Store, target: Store, *, include_history: bool = False) -> MoveReport:
    """Move pending events (oldest first) from ``source`` to ``target``; see the module docstring."""
    if not callable(getattr(source, "delete", None)):  # only SQLite can give up a pending record
        raise StoreInUse(
            f"cannot move pending events out of {type(source).__name__}; the old store must be SQLite"
        )
    pending = list(reversed(source.find(state="pending", limit=2**31 - 1)))
    now = time.time()
    busy = [r for r in pending if r.lease_owner and r.next_at > now]
    if busy:
        raise StoreInUse(
            f"{len(busy)} events are being delivered from the old store right now: restart "
            "the relay on the new store first, then move"
        )
    report = MoveReport()
    for record in pending:
        _, created = target.add(_fresh(record), owner=None, lease=0)
        report.moved += created
        report.already_there += not created
        source.delete([record.id])  # type: ignore[attr-defined]
    if include_history:
        for state in ("delivered", "dead"):
            for record in reversed(source.find(state=state, limit=2**31 - 1)):
                report.history += _copy_final(target, record)
    return report


def _fresh(record: Record) -> Record:
    """The record as the new store should receive it: pending, unleased, its body and ids kept."""
    return Record(
        id=record.id,
        cid=record.cid,
        event_id=record.event_id,
        transaction_id=record.transaction_id,
        payload=record.payload,
        received_at=record.received_at,
        dedupe_key=record.dedupe_key,
        requeued_at=record.requeued_at,  # its max_age window, if an operator gave it a new one
    )


def _copy_final(target: Store, record: Record) -> bool:
    """A delivered or dead record written in its final state (through the interface every store has)."""
    stored, created = target.add(_fresh(record), owner=_MOVER, lease=60)
    if not created:
        return False
    return target.finish(
        stored.id,
        _MOVER,
        state=record.state,
        next_at=0.0,
        status=record.last_status,
        answer=record.last_answer,
        error=record.last_error,
        uncertain=record.uncertain,
        latency_ms=record.latency_ms,
    )


__all__ = ["MoveReport", "StoreInUse", "move_events"]
