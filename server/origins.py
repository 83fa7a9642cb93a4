"""Origin matching for CORS and for plain requests (sendBeacon sends an Origin too). Pure."""

from __future__ import annotations

import re
from collections.abc import Collection

# What a browser sends: scheme://host[:port], the host made of DNS labels (or an IPv4 address).
# Anything else (a '?', '@', '/', a space...) is no origin a browser produces: it is refused before
# any pattern is tried, so it can neither match a wildcard nor be echoed in a CORS header.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ORIGIN_RE = re.compile(rf"^https?://{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?$", re.ASCII)


def well_formed_origin(origin: str | None) -> bool:
    """True when ``origin`` has the shape of a browser's Origin header (lower case, no path)."""
    return bool(origin) and len(origin or "") <= 300 and _ORIGIN_RE.match(origin or "") is not None


def origin_allowed(origin: str | None, allowed: Collection[str]) -> bool:
    """True when ``origin`` is one of ``allowed``: exact, or ``scheme://*.domain`` for any subdomain.

    ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``
    itself nor ``evil-example.com``; the scheme and port must match exactly. A malformed origin
    (see :func:`well_formed_origin`) matches nothing.
    """
    if not allowed or not well_formed_origin(origin):  # no patterns (most staging_origins): no scan
        return False
    assert origin is not None
    for pattern in allowed:
        if pattern == origin:
            return True
        if "://*." in pattern:
            scheme, rest = pattern.split("://*.", 1)
            prefix = scheme + "://"
            if origin.startswith(prefix) and origin.endswith("." + rest):
                host = origin[len(prefix) : -len(rest) - 1]
                if host and ":" not in host:
                    return True
    return False
