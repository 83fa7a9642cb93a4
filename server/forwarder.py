"""Forwarding to Pingtree: httpx clients (sync for the inline attempt, async for the delivery engine),
and a pure classification of each answer.

The classification is the heart of "retry until Pingtree answers" without counting twice:

========================================  ==========================================
Pingtree's answer                          what the relay does
========================================  ==========================================
2xx                                        delivered
400 Duplicate event for this transaction   delivered, if an earlier attempt's outcome
                                           was unknown (it was our own); else dead
other 4xx                                  dead, with Pingtree's message as the reason
403 Source Inactive                        dead
403 anything else (the 2-second lock)      retry once the lock window has passed; after
                                           ``LOCK_RETRIES`` of them, with backoff (a 403 that
                                           is no lock, a firewall's, must not come every 2 s)
408, 429                                   retry, ``Retry-After`` as a floor
5xx, timeout, connection error             retry with backoff until the maximum age
========================================  ==========================================
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from .transport import MAX_ANSWER_BYTES, AsyncH11Transport
from .upstream import ROUTE_KEY, route
from .upstream_state import UpstreamState, shared_dir

DUPLICATE_MESSAGE = "Duplicate event for this transaction_id"
SOURCE_INACTIVE = "Source Inactive"
LOCK_SECONDS = 2.0  # Pingtree's documented lock per transaction_id + event_id
LOCK_RETRIES = 3  # 403s retried at the lock's pace; past them, the backoff's
_STATUS_DIGITS = re.compile("[0-9]{3}")  # an HTTP status as an answer body may write it
# Where a parsed answer can hold a lone surrogate: a "\\u" escape, UTF-8 bytes of a surrogate
# (json.loads decodes bytes with surrogatepass), or a UTF-16/32 body (NUL bytes in its ASCII).
_MAY_HOLD_A_SURROGATE = re.compile(rb"\\u|\xed[\xa0-\xbf]|\x00")
MAX_REASON = 300  # characters of an answer's message kept as a reason (it is stored and logged)


def _connect_error(kind: type[httpx.TransportError]) -> str:
    """An attempt's error when no request left this machine."""
    return f"connect: {kind.__name__}"


# Of those, the ones that say Pingtree itself cannot be reached (our own full pool does not).
_UNREACHABLE_ERRORS = frozenset(_connect_error(kind) for kind in (httpx.ConnectError, httpx.ConnectTimeout))


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt produced: an HTTP answer, or a transport error."""

    status: int | None
    answer: dict[str, Any] | None = None
    error: str | None = None
    # True when the request may have reached Pingtree and been processed without us seeing the
    # answer (read timeout, connection dropped mid-answer, 5xx).
    uncertain: bool = False
    retry_after: float | None = None
    latency_ms: float = 0.0

    @property
    def unreachable(self) -> bool:
        """No connection to Pingtree could be made (refused, unresolvable, connect timeout): the
        upstream's state, not this event's (a full pool of ours is neither)."""
        return self.error in _UNREACHABLE_ERRORS


@dataclass(frozen=True)
class Decision:
    """``state`` is ``delivered``, ``dead`` or ``retry``; ``delay`` only for ``retry``."""

    state: str
    reason: str = ""
    delay: float = 0.0


def backoff(
    attempts: int, *, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff with jitter: in [d/2, d] where d = min(cap, base * 2**(attempts-1))."""
    ceiling = min(cap, base * (2 ** max(0, attempts - 1)))
    return (rng or random).uniform(ceiling / 2, ceiling)


def classify(
    attempt: Attempt,
    *,
    attempts: int,
    was_uncertain: bool,
    base: float = 1.0,
    cap: float = 300.0,
) -> Decision:
    """Decide what to do with an event after ``attempt`` (its ``attempts``-th)."""
    status = answered_status(attempt.status, attempt.answer)
    message = _text(str((attempt.answer or {}).get("message", "")))
    if status is not None and 200 <= status < 300:
        return Decision("delivered")
    if status is not None and 300 <= status < 400:
        # Never followed: the relay posts to relay.upstream_url and nowhere else. A redirect means
        # the event was not processed (Pingtree moved, or the URL says http:// for https://), so it
        # waits, backing off, and goes once the operator corrects the URL (a reload, no requeue).
        where = f" to {message}" if message else ""
        return Decision(
            "retry",
            reason=f"{status} redirect{where}: check relay.upstream_url",
            delay=backoff(attempts, base=base, cap=cap),
        )
    if status == 400 and message == DUPLICATE_MESSAGE and was_uncertain:
        # An earlier attempt of ours got through but its answer was lost: this is our own event.
        return Decision("delivered", reason="duplicate after an attempt with unknown outcome")
    if status == 403 and message.strip().rstrip(".").lower() != SOURCE_INACTIVE.lower():
        delay = LOCK_SECONDS + random.uniform(0.1, 0.5)
        if attempts > LOCK_RETRIES:
            delay = max(delay, backoff(attempts - LOCK_RETRIES, base=base, cap=cap))
        if attempt.retry_after is not None:
            delay = max(delay, min(attempt.retry_after, 3600.0))
        return Decision("retry", reason=message or "403", delay=delay)
    if status in (408, 429) or status is None or status >= 500:
        delay = backoff(attempts, base=base, cap=cap)
        if attempt.retry_after is not None:
            delay = max(delay, min(attempt.retry_after, 3600.0))
        return Decision("retry", reason=attempt.error or f"{status} {message}".strip(), delay=delay)
    return Decision("dead", reason=f"{status} {message}".strip())


def answered_status(status: int | None, body: dict[str, Any] | None) -> int | None:
    """The status Pingtree meant: its answer's own ``status`` (a number or a string of digits, the
    API reference's schema) or ``type: "error"`` when they contradict an HTTP 2xx, else the HTTP
    status. A 2xx whose body says it failed is not counted as delivered: it is dead-lettered with
    its message, where an operator sees it (and can requeue it)."""
    if status is None or not 200 <= status < 300 or not isinstance(body, dict):
        return status
    said = body.get("status")
    if isinstance(said, str) and _STATUS_DIGITS.fullmatch(said.strip()):  # not str.isdigit: "²" is one
        said = int(said.strip())
    if isinstance(said, int) and not isinstance(said, bool) and 400 <= said < 600:
        return said
    if str(body.get("type", "")).lower() == "error":
        return 400
    return status


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from ``Retry-After``: a number of seconds or an HTTP date (RFC 9110 10.2.3)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo is not None else None


def _text(message: str) -> str:
    """``message`` as text any store and log can take: at most ``MAX_REASON`` characters, and a lone
    surrogate (a JSON escape like "\\ud800" decodes to one, and no UTF-8 encoder takes it) replaced."""
    return plain(message[:MAX_REASON])


_HEADERS = {"user-agent": "pingtree-relay/0.1", "content-type": "application/json"}
_RAW_HEADERS = tuple((name.encode(), value.encode()) for name, value in _HEADERS.items())


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(seconds, 3.0))


class _Upstream:
    """What both forwarders share: where events go, and how an answer or an error becomes an Attempt."""

    def __init__(self, upstream_url: str, timeout: float) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.timeout = timeout
        # The latest attempt's outcome, for /readyz: (unix time, answered at all, status or error);
        # also written for the whole box (every worker and the delivery engine) when under serve.
        self.last: tuple[float, bool, str] | None = None
        self.upstream = UpstreamState(shared_dir())

    def _note(self, answered: bool, detail: str) -> None:
        self.last = (time.time(), answered, detail)
        self.upstream.record(answered, detail)

    def url_for(self, cid: str) -> str:
        return f"{self.upstream_url}/api/event/{cid}"

    def _answered(self, response: httpx.Response, started: float) -> Attempt:
        self._note(response.status_code < 500, f"HTTP {response.status_code}")
        if 300 <= response.status_code < 400:  # never followed: where it points is all it says
            location = response.headers.get("location", "")
            answer: dict[str, Any] | None = {"message": location[:200]} if location else None
        else:
            answer = _json_or_none(response)
        meant = answered_status(response.status_code, answer)
        return Attempt(
            response.status_code,
            answer=answer,
            uncertain=meant is not None
            and meant >= 500,  # a 2xx whose body says 5xx may have been recorded, like a 5xx
            retry_after=_retry_after(response),
            latency_ms=_ms(started),
        )

    def _failed(self, exc: httpx.TransportError, started: float) -> Attempt:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            # Never left this machine: certainly not processed.
            self._note(False, _connect_error(type(exc)))
            return Attempt(None, error=_connect_error(type(exc)), latency_ms=_ms(started))
        self._note(False, type(exc).__name__)
        return Attempt(None, error=f"{type(exc).__name__}", uncertain=True, latency_ms=_ms(started))


class Forwarder(_Upstream):
    """Posts events to ``{upstream_url}/api/event/{cid}`` over one pooled client (the inline attempt).

    The upstream URL comes from configuration only; nothing in a request can change where the
    relay connects (no open proxy). ``transport`` lets unit tests use ``httpx.MockTransport``.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(upstream_url, timeout)
        self._client = httpx.Client(
            timeout=_timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            headers=_HEADERS,
            follow_redirects=False,
        )

    def send(self, cid: str, body: dict[str, Any], *, timeout: float | None = None) -> Attempt:
        """One attempt, of at most ``timeout`` seconds (the forwarder's by default) however the answer
        trickles in, and an answer of at most ``MAX_ANSWER_BYTES``. Never raises for network
        trouble: it is reported in the :class:`Attempt`."""
        started = time.perf_counter()
        seconds = self.timeout if timeout is None else timeout
        url, body = route(self.upstream_url, cid, body)  # campaign form, or Pingtree's global API
        try:
            # httpx's timeouts are per read: an answer dripping a byte at a time would outlast them
            # all, and the attempt its lease. Read as a stream, against one deadline.
            with self._client.stream(
                "POST", url, content=json.dumps(body), timeout=_timeout(seconds)
            ) as response:
                answer = _read_whole(response, deadline=started + seconds)
        except httpx.TransportError as exc:
            return self._failed(exc, started)
        return self._answered(answer, started)

    def close(self) -> None:
        self._client.close()


class AsyncSender(Protocol):
    """What the delivery engine needs of a forwarder (:class:`AsyncForwarder`, or the staging gate)."""

    @property
    def last(self) -> tuple[float, bool, str] | None: ...

    async def send(self, cid: str, body: dict[str, Any]) -> Attempt: ...

    async def aclose(self) -> None: ...


class AsyncForwarder(_Upstream):
    """The delivery engine's forwarder: the same requests and answers, hundreds at once on one loop.

    It speaks httpx's transport interface directly (``httpx.Request`` in, ``httpx.Response`` out,
    httpx's timeouts and errors) rather than through ``httpx.AsyncClient``: the client's per-request
    layers (URL merging, cookies, auth, redirect handling) cost more CPU than the whole transport
    (docs/durability.md) and none applies here: no auth, no cookies, redirects are not followed.
    The transport (:class:`server.transport.AsyncH11Transport` by default) is built inside the
    engine's event loop and belongs to it.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        timeout: float = 10.0,
        max_connections: int = 400,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(upstream_url, timeout)
        self._transport = transport or AsyncH11Transport(max_connections=max_connections)
        # The attempt's one deadline (send) bounds the write and the read: only the connect has a
        # limit of its own (a refused or silent host is "not processed", classified apart), and the
        # pool's wait. No timer per read or write besides the deadline's.
        self._extensions = {
            "timeout": {"connect": min(timeout, 3.0), "read": None, "write": None, "pool": timeout}
        }
        self._targets: dict[str, tuple[httpx.URL, list[tuple[bytes, bytes]]]] = {}  # per campaign

    def _target(self, url: str) -> tuple[httpx.URL, list[tuple[bytes, bytes]]]:
        """``url`` parsed, and the headers every request to it carries (``Host`` first, as httpx puts it)."""
        parsed = httpx.URL(url)
        return parsed, [(b"Host", parsed.netloc), *_RAW_HEADERS]

    async def send(self, cid: str, body: dict[str, Any]) -> Attempt:
        """One attempt; never raises for network trouble (see :class:`Forwarder`)."""
        started = time.perf_counter()
        if ROUTE_KEY in body:  # a postback source routed to Pingtree's global API
            target, body = route(self.upstream_url, cid, body)
            url, headers = self._target(target)
        else:
            url, headers = self._targets.get(cid) or self._targets.setdefault(
                cid, self._target(self.url_for(cid))
            )
        content = json.dumps(body).encode()
        # stream=, not content=: the same request and bytes on the wire, without httpx working out
        # Host and Content-Length and copying the headers twice per request (16 us, 3.5 with stream=).
        request = httpx.Request(
            "POST",
            url,
            headers=[*headers, (b"Content-Length", str(len(content)).encode())],
            stream=httpx.ByteStream(content),
            extensions=self._extensions,
        )
        try:
            # One deadline for the whole attempt (a pool wait, the connect, the write, an answer that
            # trickles in): the lease must outlast it (config: lease_seconds > upstream_timeout).
            async with asyncio.timeout(self.timeout):
                response = await self._transport.handle_async_request(request)
                await response.aread()
        except TimeoutError:
            return self._failed(httpx.ReadTimeout("the attempt took longer than upstream_timeout"), started)
        except httpx.TransportError as exc:
            return self._failed(exc, started)
        return self._answered(response, started)

    async def aclose(self) -> None:
        await self._transport.aclose()


def _read_whole(response: httpx.Response, *, deadline: float) -> httpx.Response:
    """``response`` read whole by ``deadline`` (``time.perf_counter``) and within ``MAX_ANSWER_BYTES``
    (decoded: a small gzip bomb counts at its size), else the httpx error the engine's transport
    raises for the same; returned as a response read already."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise httpx.RemoteProtocolError(
                f"an answer beyond {MAX_ANSWER_BYTES} bytes", request=response.request
            )
        if time.perf_counter() > deadline:
            raise httpx.ReadTimeout(
                "the answer took longer than the attempt's timeout", request=response.request
            )
        chunks.append(chunk)
    headers = [
        (k, v) for k, v in response.headers.raw if k.lower() not in (b"content-encoding", b"content-length")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(chunks), request=response.request
    )


def _json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return {"message": response.text[:200]}
    if _MAY_HOLD_A_SURROGATE.search(response.content):  # one C scan; plain() was 2 % of delivery's CPU
        data = plain(data)
    return data if isinstance(data, dict) else {"message": str(data)[:200]}


def plain(value: Any) -> Any:
    """``value`` (parsed JSON) with every lone surrogate replaced: "\\ud800" decodes to one, and no
    UTF-8 encoder takes it, so a page rendering it (the dashboard) or a store writing it would fail."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
