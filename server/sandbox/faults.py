"""Injected faults: how the sandbox misbehaves on purpose so the relay's retry logic can be tested.

A fault is plain data, parsed and checked here; :class:`~server.sandbox.state.SandboxState` keeps
the queue and hands one fault to each event request. ``when`` says whether the misbehaviour
happens *before* the event is processed (Pingtree never saw it) or *after* (Pingtree recorded it,
but the caller never learns so, or learns late) — the difference the relay's at-least-once
delivery and deduplication must survive.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from http import HTTPStatus
from typing import Any, Literal

from server.errors import ApiError

MAX_DELAY_MS = 120_000  # longer than any caller timeout we use; a stuck thread would hide bugs
_KEYS = frozenset({"status", "message", "count", "delay_ms", "when", "drop"})


@dataclass(frozen=True)
class Fault:
    """One kind of misbehaviour, applied to the next ``count`` event requests (None: until cleared)."""

    status: int | None = None  # answer this status (Pingtree-shaped body) instead of the real answer
    message: str | None = None  # message of that answer; the status's reason phrase by default
    delay_ms: float = 0.0  # sleep this long before answering
    when: Literal["before", "after"] = "before"  # relative to processing the event
    drop: bool = False  # close the TCP connection without any HTTP answer
    count: int | None = None

    @property
    def processes_event(self) -> bool:
        """Whether the event is processed (recorded, locked, deduplicated) at all."""
        return self.when == "after" or (self.status is None and not self.drop)

    def answer_message(self) -> str:
        return self.message or HTTPStatus(self.status or 500).phrase

    def to_json(self, remaining: int | None) -> dict[str, Any]:
        return {**self.as_dict, "remaining": remaining}

    @cached_property
    def as_dict(self) -> dict[str, Any]:
        """The fault's fields (computed once: every request a fault applies to records them)."""
        return asdict(self)


def parse_faults(raw: Any) -> list[Fault]:
    """``{...}``, ``[{...}, ...]`` or ``{"faults": [...]}`` -> faults; ApiError 400 names the bad key."""
    if isinstance(raw, dict) and set(raw) == {"faults"}:
        raw = raw["faults"]
    items = raw if isinstance(raw, list) else [raw]
    return [_fault(f"faults[{i}]", item) for i, item in enumerate(items)]


def _bad(path: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid fault: {path} {message}", invalid={path: message})


def _fault(path: str, raw: Any) -> Fault:
    if not isinstance(raw, dict):
        raise _bad(path, "should be an object")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _bad(f"{path}.{unknown[0]}", "is not a fault option")
    fault = Fault(
        status=_optional_int(f"{path}.status", raw.get("status"), 100, 599),
        message=_optional_str(f"{path}.message", raw.get("message")),
        delay_ms=_delay(f"{path}.delay_ms", raw.get("delay_ms", 0)),
        when=_when(f"{path}.when", raw.get("when", "before")),
        drop=_flag(f"{path}.drop", raw.get("drop", False)),
        count=_optional_int(f"{path}.count", raw.get("count"), 1, 10**9),
    )
    if fault.drop and fault.status is not None:
        raise _bad(path, "cannot both drop the connection and answer a status")
    if not fault.drop and fault.status is None and fault.delay_ms == 0:
        raise _bad(path, "needs status, delay_ms or drop")
    return fault


def _optional_int(path: str, v: Any, low: int, high: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _bad(path, f"should be a whole number from {low} to {high}")
    return v


def _optional_str(path: str, v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise _bad(path, "should be a string")
    return v


def _delay(path: str, v: Any) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or not 0 <= v <= MAX_DELAY_MS
    ):
        raise _bad(path, f"should be a number of milliseconds from 0 to {MAX_DELAY_MS}")
    return float(v)


def _when(path: str, v: Any) -> Literal["before", "after"]:
    if v == "before":
        return "before"
    if v == "after":
        return "after"
    raise _bad(path, 'should be "before" or "after"')


def _flag(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(path, "should be true or false")
    return v
