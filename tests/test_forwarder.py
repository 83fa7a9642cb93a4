"""Classification of Pingtree's answers, and the forwarder over httpx.MockTransport."""

from __future__ import annotations

import datetime
import email.utils
import json
import random

import httpx
import pytest

from server.forwarder import (
    LOCK_RETRIES,
    LOCK_SECONDS,
    Attempt,
    Decision,
    Forwarder,
    _retry_after,
    backoff,
    classify,
)
from server.transport import MAX_ANSWER_BYTES


@pytest.mark.parametrize(
    ("attempt", "uncertain", "state"),
    [
        (Attempt(200, {"status": 200}), False, "delivered"),
        (Attempt(400, {"message": "Duplicate event for this transaction_id"}), True, "delivered"),
        (Attempt(400, {"message": "Duplicate event for this transaction_id"}), False, "dead"),
        (Attempt(400, {"message": "Invalid event_id for this campaign"}), True, "dead"),
        (Attempt(403, {"message": "Source Inactive"}), False, "dead"),
        (Attempt(403, {"message": "Concurrent event in progress"}), False, "retry"),
        (Attempt(408, {}), False, "retry"),
        (Attempt(429, {}, retry_after=30), False, "retry"),
        (Attempt(500, {}), False, "retry"),
        (Attempt(503, None), False, "retry"),
        (Attempt(None, error="ReadTimeout", uncertain=True), False, "retry"),
        (Attempt(None, error="connect: ConnectError"), False, "retry"),
        (Attempt(404, {"message": "Not found"}), False, "dead"),
        # An HTTP 2xx whose body says otherwise (the API's schema: status a string, type
        # "success" or "error") is what the body says, not a delivery.
        (Attempt(200, {"status": 400, "message": "Invalid event_id for this campaign"}), False, "dead"),
        (Attempt(200, {"status": "400", "type": "error", "message": "revenue is required"}), False, "dead"),
        (Attempt(200, {"type": "error", "message": "Lead not found"}), False, "dead"),
        (Attempt(200, {"status": " 403", "message": "Concurrent event in progress"}), False, "retry"),
        (Attempt(200, {"status": 500}), False, "retry"),
        (
            Attempt(200, {"status": "400", "message": "Duplicate event for this transaction_id"}),
            True,
            "delivered",
        ),
        (Attempt(200, {"status": "200", "type": "success"}), False, "delivered"),
        (Attempt(200, {"status": True, "type": "Success"}), False, "delivered"),
        (Attempt(201, {"message": "Event triggered successfully"}), False, "delivered"),
        # Digits int() cannot read are no status (str.isdigit says "²" is a digit), nor is a number
        # too long for int(): neither may raise, or the batch it is in would never be stored.
        (Attempt(200, {"status": "²"}), False, "delivered"),
        (Attempt(200, {"status": "4" * 5000}), False, "delivered"),
        # A redirect is never followed, nor is the event given up: it waits for the URL to be fixed.
        (Attempt(301, {"message": "https://up.example/api/event/c"}), False, "retry"),
        (Attempt(308, None), False, "retry"),
    ],
)
def test_classify(attempt: Attempt, uncertain: bool, state: str) -> None:
    assert classify(attempt, attempts=1, was_uncertain=uncertain).state == state


def test_lock_retry_waits_out_the_two_second_window() -> None:
    decision = classify(
        Attempt(403, {"message": "Concurrent event in progress"}), attempts=1, was_uncertain=False
    )
    assert 2.0 < decision.delay < 3.0


def test_retry_after_is_a_floor() -> None:
    decision = classify(Attempt(429, {}, retry_after=40), attempts=1, was_uncertain=False, base=1, cap=5)
    assert decision.delay == 40


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff(n, base=1, cap=60, rng=rng) for n in range(1, 12)]
    assert 0.5 <= delays[0] <= 1 and 4 <= delays[3] <= 8
    assert all(30 <= d <= 60 for d in delays[7:])
    assert len({round(d, 6) for d in delays[7:]}) > 1  # jitter: not all the same


def test_forwarder_posts_json_to_the_campaign_path() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": 200, "data": {"conversion_id": "c"}})

    forwarder = Forwarder("http://up.example/", transport=httpx.MockTransport(handler))
    attempt = forwarder.send("cmp_1", {"event_id": "x"})
    assert attempt.status == 200 and attempt.answer == {"status": 200, "data": {"conversion_id": "c"}}
    assert str(seen[0].url) == "http://up.example/api/event/cmp_1"
    assert json.loads(seen[0].content) == {"event_id": "x"}
    assert seen[0].headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("exc", "uncertain"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ReadTimeout("slow"), True),
        (httpx.RemoteProtocolError("dropped"), True),
    ],
)
def test_transport_errors_are_attempts_not_exceptions(exc: Exception, uncertain: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    attempt = Forwarder("http://up.example", transport=httpx.MockTransport(handler)).send("c", {})
    assert attempt.status is None and attempt.uncertain is uncertain and attempt.error


def test_a_redirect_is_not_followed_and_names_where_it_points() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            301, headers={"Location": "https://up.example/api/event/c"}, text="<html>moved</html>"
        )

    attempt = Forwarder("http://up.example", transport=httpx.MockTransport(handler)).send("c", {})
    assert len(seen) == 1 and attempt.status == 301 and not attempt.uncertain
    decision = classify(attempt, attempts=1, was_uncertain=False, base=1, cap=300)
    assert decision.state == "retry" and 0.5 <= decision.delay <= 1
    assert decision.reason == "301 redirect to https://up.example/api/event/c: check relay.upstream_url"


def test_a_redirect_without_location_says_so_and_not_what_its_body_says() -> None:
    answer = {"message": "Moved"}
    transport = httpx.MockTransport(lambda request: httpx.Response(302, json=answer))
    attempt = Forwarder("http://up.example", transport=transport).send("c", {})
    decision = classify(attempt, attempts=1, was_uncertain=False, base=1, cap=300)
    assert decision.state == "retry" and decision.reason == "302 redirect: check relay.upstream_url"


def test_an_answer_with_lone_surrogates_is_made_plain_as_it_arrives() -> None:
    body = (
        b'{"status":400,"message":"Invalid pid \\ud800","invalidFields":{"pid":"bad \\udfff"},"ok":"\\u00e9"}'
    )
    forwarder = Forwarder(
        "http://up.example", transport=httpx.MockTransport(lambda r: httpx.Response(400, content=body))
    )
    attempt = forwarder.send("c", {})
    assert attempt.answer == {
        "status": 400,
        "message": "Invalid pid ?",
        "invalidFields": {"pid": "bad ?"},
        "ok": "\u00e9",
    }


def test_a_2xx_whose_body_says_5xx_is_uncertain_like_a_5xx() -> None:
    # Pingtree may have recorded it: the retry's "Duplicate event" must then count as delivered.
    forwarder = Forwarder(
        "http://up.example",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "500", "message": "x"})),
    )
    attempt = forwarder.send("c", {})
    assert attempt.status == 200 and attempt.uncertain
    assert classify(attempt, attempts=1, was_uncertain=False).state == "retry"


@pytest.mark.parametrize(
    "body",
    [
        b'{"status":400,"message":"x\xed\xa0\x80y"}',  # UTF-8 bytes of a surrogate
        '{"status":400,"message":"x\ud800y"}'.encode("utf-16-le", "surrogatepass"),  # a UTF-16 body
    ],
    ids=["utf-8", "utf-16"],
)
def test_bytes_that_decode_to_a_lone_surrogate_are_made_plain_too(body: bytes) -> None:
    # No "\\u" escape in sight: json.loads decodes bytes with surrogatepass.
    forwarder = Forwarder(
        "http://up.example", transport=httpx.MockTransport(lambda r: httpx.Response(400, content=body))
    )
    assert forwarder.send("c", {}).answer == {"status": 400, "message": "x?y"}


def test_non_json_answer_is_kept_as_message() -> None:
    forwarder = Forwarder(
        "http://up.example",
        transport=httpx.MockTransport(lambda r: httpx.Response(502, text="<html>bad gateway</html>")),
    )
    attempt = forwarder.send("c", {})
    assert attempt.status == 502 and attempt.answer == {"message": "<html>bad gateway</html>"}
    assert attempt.uncertain


def test_a_message_no_store_can_encode_becomes_plain_text() -> None:
    """A JSON escape like "\\ud800" decodes to a lone surrogate, which no UTF-8 encoder takes: stored
    as the reason, it made every settle of its batch fail, and the engine resend those events."""
    decision = classify(Attempt(400, answer={"message": "bad \ud800 value"}), attempts=1, was_uncertain=False)
    assert decision == Decision("dead", reason="400 bad ? value")
    long = classify(Attempt(400, answer={"message": "x" * 5000}), attempts=1, was_uncertain=False)
    assert len(long.reason) <= 310


@pytest.mark.parametrize(
    "message", ["Source Inactive", "Source inactive", "source inactive.", " Source Inactive "]
)
def test_source_inactive_in_any_case_is_final(message: str) -> None:
    assert (
        classify(Attempt(403, answer={"message": message}), attempts=1, was_uncertain=False).state == "dead"
    )


def test_a_403_that_is_no_lock_backs_off_after_a_few_tries() -> None:
    """Pingtree's lock lasts 2 s; a 403 that keeps coming (a firewall's page, "Forbidden") must not be
    retried every 2 s for the event's 72 hours."""
    forbidden = Attempt(403, answer={"message": "Forbidden"})
    for attempts in range(1, LOCK_RETRIES + 1):
        decision = classify(forbidden, attempts=attempts, was_uncertain=False)
        assert decision.state == "retry" and LOCK_SECONDS < decision.delay <= LOCK_SECONDS + 0.5
    later = classify(forbidden, attempts=LOCK_RETRIES + 8, was_uncertain=False, base=1, cap=300)
    assert later.delay >= 2**7 / 2
    told = classify(
        Attempt(403, answer={"message": "Forbidden"}, retry_after=60), attempts=1, was_uncertain=False
    )
    assert told.delay >= 60


def test_retry_after_may_be_an_http_date() -> None:
    soon = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=120), usegmt=True
    )
    assert 100 <= (_retry_after(httpx.Response(503, headers={"Retry-After": soon})) or 0) <= 121
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "7"})) == 7.0


def test_an_inline_answer_beyond_the_limit_is_refused_not_read() -> None:
    """The engine's transport caps an answer at 1 MB; the inline attempt reads no more than it."""
    big = b"x" * (MAX_ANSWER_BYTES + 1)
    forwarder = Forwarder(
        "http://up.example/", transport=httpx.MockTransport(lambda r: httpx.Response(200, content=big))
    )
    attempt = forwarder.send("cmp_1", {"event_id": "x"})
    assert (attempt.status, attempt.error, attempt.uncertain) == (None, "RemoteProtocolError", True)
