"""Origin matching for CORS and for plain requests (sendBeacon sends an Origin too). Pure."""

from __future__ import annotations

from collections.abc import Iterable


def origin_allowed(origin: str | None, allowed: Iterable[str]) -> bool:
    """True when ``origin`` is one of ``allowed``: exact, or ``scheme://*.domain`` for any subdomain.

    ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``
    itself nor ``evil-example.com``; the scheme and port must match exactly.
    """
    if not origin or origin == "null":
        return False
    origin = origin.lower().rstrip("/")
    for pattern in allowed:
        if pattern == origin:
            return True
        if "://*." in pattern:
            scheme, rest = pattern.split("://*.", 1)
            prefix = scheme + "://"
            if origin.startswith(prefix) and origin[len(prefix):].endswith("." + rest):
                host = origin[len(prefix):-len(rest) - 1]
                if host and ":" not in host and "/" not in host:
                    return True
    return False
