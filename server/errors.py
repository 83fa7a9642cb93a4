"""One error model: an :class:`ApiError` carries its HTTP status and Pingtree-shaped body.

Every answer of the relay (and of the sandbox) has Pingtree's shape::

    {"status": 400, "type": "error", "message": "...", "data": {}, "missingFields": {}, "invalidFields": {}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def answer(
    status: int,
    message: str,
    *,
    type: str | None = None,
    data: Mapping[str, Any] | None = None,
    missing: Mapping[str, str] | None = None,
    invalid: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Pingtree-shaped answer body; ``type`` defaults to success below 400, error otherwise."""
    return {
        "status": status,
        "type": type or ("success" if status < 400 else "error"),
        "message": message,
        "data": dict(data or {}),
        "missingFields": dict(missing or {}),
        "invalidFields": dict(invalid or {}),
    }


class ApiError(Exception):
    """A request the relay will not accept; raised anywhere, turned into a response in one place."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        missing: Mapping[str, str] | None = None,
        invalid: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.missing = dict(missing or {})
        self.invalid = dict(invalid or {})
        self.headers = dict(headers or {})
        # A short machine label for metrics and logs ("invalid_event_id", "origin"...).
        self.reason = reason or _reason_from(message)

    def body(self) -> dict[str, Any]:
        return answer(self.status, self.message, missing=self.missing, invalid=self.invalid)


def _reason_from(message: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in message.lower()).split()
    return "_".join(words[:4]) or "error"
