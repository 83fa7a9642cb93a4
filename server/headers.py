"""Request headers read straight from the WSGI environ; several response headers set in one pass.

Reading: werkzeug's ``request.headers.get(name)`` looks ``HTTP_<NAME>`` up in the environ by
raising and catching a ``KeyError`` whenever the header is absent, and an event request lacks four
of the seven it asks for (a server key, Authorization, Idempotency-Key, X-Request-Id).
:func:`request_header` does the same lookup without the exception: the same value, or None.

Setting: werkzeug's ``Headers.set`` walks the whole list, lower-casing every name, once per
header it sets, and ``setdefault`` walks it up to three times. The after-request hooks of every
answer set five to seven headers that are almost never there yet: one walk tells, and each is then
appended. Where one is there after all, each is set by ``set`` (or ``setdefault``) itself.
Measured (instructions, an event's accept path in process): a ``set`` costs about 9,000 more than
an ``add`` on an event's answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from werkzeug.datastructures import Headers

from .contexts import current_request

_ENVIRON_KEYS: dict[str, str] = {}  # header name -> environ key; the names are the code's own, a handful


def request_header(name: str) -> str | None:
    """``request.headers.get(name)``: the header's value as the WSGI server gave it, or None.
    Not for Content-Type and Content-Length, which the environ keeps without the ``HTTP_`` prefix."""
    key = _ENVIRON_KEYS.get(name)
    if key is None:
        key = _ENVIRON_KEYS[name] = "HTTP_" + name.upper().replace("-", "_")
    value: str | None = current_request().environ.get(key)
    return value


def set_headers(headers: Headers, values: Mapping[str, str]) -> None:
    """``headers.set(name, value)`` for each of ``values``, in one walk when none is set yet."""
    _in_one_walk(headers, values, headers.set)


def add_missing(headers: Headers, values: Mapping[str, str]) -> None:
    """``headers.setdefault(name, value)`` for each of ``values``: only those not set already."""
    _in_one_walk(headers, values, headers.setdefault)


def _in_one_walk(headers: Headers, values: Mapping[str, str], each: Callable[[str, str], object]) -> None:
    """``each(name, value)`` for every one of ``values`` where one of them is set already; else
    (the answer has none of them: the usual case) one walk that says so, then an append each."""
    names = {name.lower() for name in values}
    if any(name.lower() in names for name, _ in headers):
        for name, value in values.items():
            each(name, value)
    else:
        for name, value in values.items():
            headers.add(name, value)
