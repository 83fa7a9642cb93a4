"""The pure parts of postbacks: parameters -> event body, and check-config naming a bad source key."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.config import ConfigError, parse_config
from server.errors import ApiError
from server.postbacks.mapping import idempotency_key, map_postback, parse_seconds
from server.upstream import ROUTE_KEY, route
from server.validation import validate_event

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t" * 32

CONFIG = f"""
[relay]
upstream_url = "https://api.pingtree.com"

[campaigns.cmp_1]
extra_fields = ["quote_id"]
[campaigns.cmp_1.events.call_completed]
conversion = true
[campaigns.cmp_1.events.quote_viewed]

[campaigns.cmp_1.postbacks.ringba]
token = "{TOKEN}"
event = "call_completed"
min_duration = 90
duration_param = "duration"
call_id_param = "call_id"
[campaigns.cmp_1.postbacks.ringba.params]
tid = "transaction_id"
payout = "amount"
"""


def config(text: str = CONFIG) -> Any:
    return parse_config(tomllib.loads(text))


def mapped(params: dict[str, Any], text: str = CONFIG, source: str = "ringba") -> dict[str, Any]:
    campaign = config(text).campaigns["cmp_1"]
    return map_postback(campaign, campaign.postbacks[source], params).body


def refusal(params: dict[str, Any], text: str = CONFIG) -> ApiError:
    with pytest.raises(ApiError) as caught:
        mapped(params, text)
    return caught.value


def test_platform_names_become_pingtree_names() -> None:
    body = mapped(
        {"token": TOKEN, "tid": "T1", "payout": "25.00", "duration": "120", "call_id": "C", "sub1": "x"}
    )
    assert body == {"transaction_id": "T1", "amount": "25.00", "sub1": "x", "event_id": "call_completed"}


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("90", 90),
        (90, 90),
        ("90.5", 90.5),
        ("1:30", 90),
        ("00:01:30", 90),
        ("-5", None),
        (10**400, None),  # too large for a float: not a length
        ("ninety", None),
        (True, None),
        ("1:3", None),
    ],
)
def test_call_length(raw: Any, seconds: float | None) -> None:
    assert parse_seconds(raw) == seconds


def test_a_call_exactly_min_duration_long_counts() -> None:
    assert mapped({"tid": "T", "payout": "1", "duration": "90"})["event_id"] == "call_completed"
    assert refusal({"tid": "T", "payout": "1", "duration": "89"}).reason == "short_call"


@pytest.mark.parametrize(
    ("amount", "lenient"),
    [
        ("$45.00", "45.00"),
        ("1,234.50", "1234.50"),
        ("USD 1,234", "1234.00"),
        ("€45.5", "45.50"),
    ],
)
def test_amounts_with_symbols_or_commas(amount: str, lenient: str) -> None:
    error = refusal({"tid": "T", "payout": amount, "duration": "100"})
    assert (error.status, error.reason, list(error.invalid)) == (400, "amount_format", ["payout"])
    text = CONFIG.replace('call_id_param = "call_id"', 'call_id_param = "call_id"\namount_format = "lenient"')
    assert mapped({"tid": "T", "payout": amount, "duration": "100"}, text)["amount"] == lenient


@pytest.mark.parametrize("amount", ["45.005 USD", "$1000.005", "$0.999", "$0.0049"])
def test_lenient_amounts_are_never_rounded(amount: str) -> None:
    """Cents are the caller's: "$0.0049" must not become a sale worth 0.00, nor "$0.999" one of 1.00."""
    text = CONFIG.replace('call_id_param = "call_id"', 'call_id_param = "call_id"\namount_format = "lenient"')
    with pytest.raises(ApiError) as caught:
        mapped({"tid": "T", "payout": amount, "duration": "100"}, text)
    assert (caught.value.status, caught.value.reason) == (400, "amount_format")
    assert caught.value.invalid == {"payout": "at most two decimals"}


def test_a_plain_but_invalid_amount_is_left_to_validation() -> None:
    assert mapped({"tid": "T", "payout": "12.345", "duration": "100"})["amount"] == "12.345"


def test_conflicting_and_reserved_parameters() -> None:
    error = refusal({"tid": "T", "transaction_id": "U", "payout": "1", "duration": "100"})
    assert error.reason == "invalid_parameter" and "conflicts with tid" in next(iter(error.invalid.values()))
    assert refusal({"tid": "T", "payout": "1", "duration": "100", "event_uuid": "x" * 10}).invalid == {
        "event_uuid": "set by the postback's configuration, not by a parameter"
    }


def test_idempotency_key_is_stable_and_scoped() -> None:
    key = idempotency_key("cmp_1", "ringba", "T", "call_completed", "C1")
    assert key == idempotency_key("cmp_1", "ringba", "T", "call_completed", "C1")
    others = {
        idempotency_key("cmp_2", "ringba", "T", "call_completed", "C1"),
        idempotency_key("cmp_1", "retreaver", "T", "call_completed", "C1"),
        idempotency_key("cmp_1", "ringba", "T", "call_completed", "C2"),
        idempotency_key("cmp_1", "ringba", "T2", "call_completed", "C1"),
    }
    assert key not in others and len(others) == 4
    assert 8 <= len(key) <= 64


def test_route_to_the_global_api_strips_its_note() -> None:
    assert route("https://u", "cmp_1", {"a": 1}) == ("https://u/api/event/cmp_1", {"a": 1})
    assert route("https://u", "cmp_1", {"a": 1, ROUTE_KEY: "org_9"}) == (
        "https://u/api/event/global/org_9",
        {"a": 1},
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            (f'token = "{TOKEN}"', 'token = "short"'),
            "campaigns.cmp_1.postbacks.ringba.token: required, at least 32 random characters",
        ),
        ((f'token = "{TOKEN}"\n', ""), "campaigns.cmp_1.postbacks.ringba.token: required"),
        (
            ('event = "call_completed"', 'event = "sale"'),
            "campaigns.cmp_1.postbacks.ringba.event: no event named 'sale' in this campaign",
        ),
        (
            ('event = "call_completed"', 'event_param = "evt"\nevent = "call_completed"'),
            "campaigns.cmp_1.postbacks.ringba.event: set exactly one of event",
        ),
        (
            ('payout = "amount"', 'payout = "payout"'),
            "campaigns.cmp_1.postbacks.ringba.params.payout: 'payout' is not a Pingtree field this campaign accepts",
        ),
        (
            ('payout = "amount"', 'payout = "cost"'),
            "campaigns.cmp_1.postbacks.ringba.params.payout: 'cost' is not a Pingtree field",
        ),
        (('duration_param = "duration"\n', ""), "campaigns.cmp_1.postbacks.ringba.duration_param: required"),
        (
            ("min_duration = 90", 'min_duration = "90"'),
            "campaigns.cmp_1.postbacks.ringba.min_duration: expected a number",
        ),
        (("call_id_param", "callid_param"), "campaigns.cmp_1.postbacks.ringba.callid_param: unknown key"),
        (
            (
                "conversion = true\n[campaigns.cmp_1.events.quote_viewed]",
                "conversion = true\nallow_duplicates = true\n[campaigns.cmp_1.events.quote_viewed]",
            ),
            None,
        ),
        (
            ('call_id_param = "call_id"', 'amount_format = "loose"'),
            "campaigns.cmp_1.postbacks.ringba.amount_format: expected one of strict, lenient",
        ),
    ],
)
def test_a_bad_source_key_is_named(change: tuple[str, str], message: str | None) -> None:
    text = CONFIG.replace(*change)
    if message is None:  # a valid change: the multi-trigger event with call_id_param set
        config(text)
        text = text.replace('call_id_param = "call_id"\n', "")
        message = "campaigns.cmp_1.postbacks.ringba.call_id_param: required because events.call_completed"
    assert text != CONFIG
    with pytest.raises(ConfigError) as caught:
        config(text)
    assert str(caught.value).startswith(message), caught.value


def test_check_config_command_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(CONFIG)
    ok = subprocess.run(
        [sys.executable, "-m", "server.cli", "check-config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    path.write_text(CONFIG.replace('payout = "amount"', 'payout = "amountt"'))
    bad = subprocess.run(
        [sys.executable, "-m", "server.cli", "check-config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "campaigns.cmp_1.postbacks.ringba.params.payout: 'amountt' is not a Pingtree field" in bad.stderr


# A source naming the event in a parameter, on a campaign with a Multi-Trigger event.
BY_PARAMETER = (
    CONFIG
    + f"""
[campaigns.cmp_1.events.call_clicked]
allow_duplicates = true

[campaigns.cmp_1.postbacks.buyer]
token = "{TOKEN}"
event_param = "evt"
call_id_param = "call_id"
[campaigns.cmp_1.postbacks.buyer.params]
tid = "transaction_id"
"""
)


def by_parameter(params: dict[str, Any], text: str = BY_PARAMETER) -> Any:
    campaign = config(text).campaigns["cmp_1"]
    return map_postback(campaign, campaign.postbacks["buyer"], params)


def test_each_call_of_a_multi_trigger_event_is_its_own_postback() -> None:
    first = by_parameter({"evt": "call_clicked", "tid": "T", "call_id": "C1"})
    second = by_parameter({"evt": "call_clicked", "tid": "T", "call_id": "C2"})
    assert first.idempotency_key != second.idempotency_key
    assert by_parameter({"evt": "call_clicked", "tid": "T", "call_id": "C1"}) == first  # a retry
    assert by_parameter({"evt": "quote_viewed", "tid": "T"}).body["event_id"] == "quote_viewed"


def test_a_multi_trigger_postback_without_its_call_id_is_refused() -> None:
    """Without a call id, a second call would get the first one's key and be answered as its retry:
    refused, naming what is missing, rather than lost behind a 202."""
    with pytest.raises(ApiError) as caught:
        by_parameter({"evt": "call_clicked", "tid": "T"})
    assert (caught.value.status, caught.value.reason) == (400, "missing_call_id")
    assert caught.value.missing == {"call_id": "required (the call's id)"}
    unconfigured = BY_PARAMETER.replace(
        'event_param = "evt"\ncall_id_param = "call_id"', 'event_param = "evt"'
    )
    with pytest.raises(ApiError) as caught:
        by_parameter({"evt": "call_clicked", "tid": "T", "call_id": "C1"}, unconfigured)
    assert caught.value.reason == "missing_call_id"
    assert "postbacks.buyer.call_id_param" in caught.value.message


@pytest.mark.parametrize("event", [5, True, ["call_clicked"], {"a": 1}, 1.5])
def test_an_event_parameter_that_is_not_text_is_refused(event: Any) -> None:
    with pytest.raises(ApiError) as caught:
        by_parameter({"evt": event, "tid": "T", "call_id": "C1"})
    assert (caught.value.status, caught.value.reason) == (400, "invalid_event_id")
    assert caught.value.invalid == {"evt": "expected a string"}


def test_the_mapping_may_name_an_extra_field() -> None:
    text = CONFIG.replace('payout = "amount"', 'payout = "amount"\nq = "quote_id"')
    assert mapped({"tid": "T", "payout": "1", "duration": "100", "q": "Q7"}, text)["quote_id"] == "Q7"


# --- hypothesis: whatever a platform sends, the answer is an event or a 4xx ---------------------------

PARAM_NAMES = [
    "tid",
    "payout",
    "duration",
    "call_id",
    "token",
    "sub1",
    "transaction_id",
    "amount",
    "cost",
    "event_id",
    "cid",
    "evt",
    "tcpa_consent",
]
values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
    | st.text(max_size=20)
    | st.sampled_from(["$1,234.50", "90", "1:30", "[tag:x]", "{{x}}", "45.00", "-3", "USD 9", ""])
)


@given(
    params=st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=8), values, max_size=10),
    lenient=st.booleans(),
)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_parameters_give_an_event_or_a_4xx(params: dict[str, Any], lenient: bool) -> None:
    text = (
        BY_PARAMETER.replace(
            'call_id_param = "call_id"', 'call_id_param = "call_id"\namount_format = "lenient"'
        )
        if lenient
        else BY_PARAMETER
    )
    campaign = config(text).campaigns["cmp_1"]
    for source in ("ringba", "buyer"):
        try:
            body = map_postback(campaign, campaign.postbacks[source], params).body
            event = validate_event(campaign, body, revenue_key="amount", trusted=False)
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.reason, exc.body()
            json.dumps(exc.body())
        else:
            assert event.event_id in campaign.events
            assert source == "buyer" or (event.event_id == "call_completed" and event.amount is not None)
