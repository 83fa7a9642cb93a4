"""The sandbox's memory: recorded requests and events, the 2-second locks, fired events, faults.

One :class:`SandboxState` per app, in ``app.extensions["sandbox"]``. Event requests run on the
sandbox server's event loop while its control API runs in threads (and the demo serves it from
gunicorn threads), so every method takes one ``threading.Lock``; the work done under it is a few
dict operations, never I/O or sleeping.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from server.config import CampaignConfig
from server.errors import ApiError, answer
from server.sandbox import rules
from server.sandbox.faults import Fault

Key = tuple[str, str, str]  # (cid, transaction_id, event_id)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SandboxState:
    """Thread-safe in-memory state; ``clock`` is injectable so lock windows can be tested exactly."""

    def __init__(
        self,
        campaigns: Mapping[str, CampaignConfig],
        *,
        lock_seconds: float,
        max_records: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.campaigns = campaigns  # read-only configuration, safe to share between threads
        self._mutex = threading.Lock()
        self._clock = clock
        self.lock_seconds = lock_seconds
        self._max_records = max_records
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=self._max_records)
        self._requests: deque[dict[str, Any]] = deque(maxlen=self._max_records)
        self._locks: dict[Key, float] = {}  # key -> monotonic time the lock expires
        self._fired: set[Key] = set()
        self._leads: dict[str, str] = {}  # transaction_id -> cid of its first event (the global API's lookup)
        self._faults: list[list[Any]] = []  # [Fault, remaining count or None]
        self._counts: Counter[str] = Counter()
        self._held = 0  # answers being held back by a delay fault right now
        self._by_status: Counter[str] = Counter()
        self._by_message: Counter[str] = Counter()
        self._next_id = 1

    def reset(self) -> None:
        """Forget records, locks, fired events and faults; ``lock_seconds`` is configuration and stays."""
        with self._mutex:
            self._reset_locked()

    # --- event processing: the stateful rules, in Pingtree's order (lock, then duplicates) ----------

    def fire(self, accepted: rules.Accepted, body: Mapping[str, Any]) -> dict[str, Any]:
        """Process an event that passed the stateless rules; the success answer, or ApiError."""
        key = (accepted.cid, accepted.transaction_id, accepted.event.name)
        with self._mutex:
            now = self._clock()
            if self._locks.get(key, 0.0) > now:
                raise ApiError(403, rules.CONCURRENT)
            self._take_lock(key, now)
            if not accepted.event.allow_duplicates and key in self._fired:
                raise ApiError(400, rules.DUPLICATE)
            self._fired.add(key)
            self._leads.setdefault(accepted.transaction_id, accepted.cid)
            result = answer(
                200,
                rules.SUCCESS,
                data={
                    "cid": accepted.cid,
                    "pid": accepted.pid,
                    "transaction_id": accepted.transaction_id,
                    "conversion_id": f"conv_{uuid.uuid4()}" if accepted.event.conversion else "",
                    "conversion": accepted.event.conversion,
                },
            )
            # Recorded while still holding the lock: a caller that times out and asks the control
            # API straight away already sees the event (the "processed, answered late" case).
            self._events.append(
                {
                    "id": self._new_id(),
                    "received_at": utc_now(),
                    "cid": accepted.cid,
                    "event_id": accepted.event.name,
                    "transaction_id": accepted.transaction_id,
                    "body": dict(body),
                    "answer": result,
                }
            )
            self._counts["accepted"] += 1
            self._counts["conversions"] += accepted.event.conversion
            return result

    def lead_campaign(self, transaction_id: str) -> str | None:
        """The campaign of the lead ``transaction_id`` names: the one its first accepted event went to."""
        with self._mutex:
            return self._leads.get(transaction_id)

    def _take_lock(self, key: Key, now: float) -> None:
        # Expired locks are swept now and then so a long demo does not grow the dict forever.
        if len(self._locks) > 10_000:
            self._locks = {k: t for k, t in self._locks.items() if t > now}
        self._locks[key] = now + self.lock_seconds

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def hold(self, change: int) -> None:
        """Count an answer starting (+1) or ending (-1) a delay fault's wait."""
        with self._mutex:
            self._held += change

    # --- records --------------------------------------------------------------------------------

    def record_request(self, record: dict[str, Any]) -> None:
        """Store one request to an event endpoint (``status`` None when the connection was dropped)."""
        with self._mutex:
            record["id"] = self._new_id()
            self._requests.append(record)
            self._counts["requests"] += 1
            self._counts["faults_applied"] += record.get("fault") is not None
            self._counts["dropped"] += record.get("status") is None
            self._by_status[str(record.get("status") or "dropped")] += 1
            message = (record.get("answer") or {}).get("message")
            if message:
                self._by_message[message] += 1

    def events(self, **filters: str | None) -> list[dict[str, Any]]:
        """Accepted events, oldest first; each non-empty filter (cid, event_id, transaction_id) must match."""
        wanted = {k: v for k, v in filters.items() if v}
        with self._mutex:
            return [e for e in self._events if all(e[k] == v for k, v in wanted.items())]

    def requests(self) -> list[dict[str, Any]]:
        with self._mutex:
            return list(self._requests)

    def latest_requests(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` requests, newest first (for the HTML page)."""
        with self._mutex:
            return list(reversed(self._requests))[:limit]

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset. ``accepted`` counts events processed successfully, even when
        a fault then replaced or dropped the answer; ``rejected`` counts answers of 400 and above."""
        with self._mutex:
            now = self._clock()
            counts = {
                k: self._counts[k]
                for k in ("requests", "accepted", "conversions", "faults_applied", "dropped")
            }
            return {
                **counts,
                "rejected": sum(
                    n for status, n in self._by_status.items() if status.isdigit() and int(status) >= 400
                ),
                "by_status": dict(self._by_status),
                "by_message": dict(self._by_message),
                "active_locks": sum(1 for t in self._locks.values() if t > now),
                "held": self._held,
            }

    # --- faults ---------------------------------------------------------------------------------

    def set_faults(self, faults: list[Fault]) -> None:
        """Replace the fault queue; each event request consumes the head of it."""
        with self._mutex:
            self._faults = [[f, f.count] for f in faults]

    def take_fault(self) -> Fault | None:
        """The fault for this event request, if any, counting it against its ``count``."""
        with self._mutex:
            if not self._faults:
                return None
            entry = self._faults[0]
            if entry[1] is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    self._faults.pop(0)
            return entry[0]

    def faults(self) -> list[dict[str, Any]]:
        with self._mutex:
            return [fault.to_json(remaining) for fault, remaining in self._faults]
