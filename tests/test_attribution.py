"""Ad click ids: one list (server/attribution.py) that the SDK captures, every campaign accepts and
forwards under its own name, and that fills Pingtree's external_clickid. Pure; no servers."""

from __future__ import annotations

import re
import time

import pytest

from server import sdk
from server.attribution import CLICK_IDS, with_external_clickid
from server.config import ConfigError, parse_config
from server.enrichment import forward_body
from server.validation import validate_event

ISSUE_ORDER = (
    "gclid",
    "gbraid",
    "wbraid",
    "fbclid",
    "msclkid",
    "ttclid",
    "li_fat_id",
    "twclid",
    "ScCid",
    "irclickid",
)


def config(**campaign: object):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "relay": {"upstream_url": "http://127.0.0.1:1"},
            "campaigns": {"cmp_a": {"events": {"lead": {}}, **campaign}},
        }
    )


def forwarded(campaign_keys: dict, body: dict) -> dict:
    c = config(**campaign_keys).campaigns["cmp_a"]
    event = validate_event(c, {"event_id": "lead", "transaction_id": "t1", **body})
    return forward_body(c, event, received_at=time.time(), ip_address=None, user_agent=None)


def test_the_issue_order_comes_first() -> None:
    assert CLICK_IDS[: len(ISSUE_ORDER)] == ISSUE_ORDER
    assert len(set(CLICK_IDS)) == len(CLICK_IDS)


@pytest.mark.parametrize("click_id", CLICK_IDS)
def test_every_click_id_is_accepted_forwarded_and_mapped_with_no_config(click_id: str) -> None:
    body = forwarded({}, {click_id: "abc"})
    assert body[click_id] == "abc" and body["external_clickid"] == "abc"


@pytest.mark.parametrize("click_id", CLICK_IDS)
def test_every_click_id_is_in_the_sdk(click_id: str) -> None:
    c = config()
    js = sdk.render_sdk(c.campaigns["cmp_a"], c.relay).body.decode()
    # The build writes the parameters as one regular expression (sdk.name_pattern), the ids first.
    captured = re.search(r"/(\^\(transaction_id\|pid\|clid\|external_clickid\|[^/]+)/\.test\(", js)
    assert captured and re.fullmatch(captured.group(1), click_id)


@pytest.mark.parametrize("position", range(len(CLICK_IDS)))
def test_the_first_present_in_order_wins(position: int) -> None:
    present = {name: f"v-{name}" for name in CLICK_IDS[position:]}
    assert with_external_clickid(present, CLICK_IDS)["external_clickid"] == f"v-{CLICK_IDS[position]}"


def test_the_landing_urls_external_clickid_wins() -> None:
    assert forwarded({}, {"gclid": "g", "external_clickid": "mine"})["external_clickid"] == "mine"


def test_external_clickid_from_changes_the_order_and_empty_turns_it_off() -> None:
    both = {"gclid": "g", "ttclid": "t"}
    assert forwarded({"external_clickid_from": ["ttclid", "gclid"]}, both)["external_clickid"] == "t"
    assert "external_clickid" not in forwarded({"external_clickid_from": []}, both)
    # Any attribution field may feed it, e.g. clid.
    assert (
        forwarded({"external_clickid_from": ["clid"]}, {"clid": "c", "gclid": "g"})["external_clickid"] == "c"
    )


def test_empty_values_do_not_count() -> None:
    assert with_external_clickid({"gclid": "", "fbclid": "f"}, CLICK_IDS)["external_clickid"] == "f"
    assert "external_clickid" not in with_external_clickid({"gclid": ""}, CLICK_IDS)


def test_external_clickid_from_names_a_field_the_relay_accepts() -> None:
    with pytest.raises(ConfigError, match=r"campaigns.cmp_a.external_clickid_from\[0\]"):
        config(external_clickid_from=["nope"])
    assert config(external_clickid_from=["promo"], extra_fields=["promo"]).campaigns[
        "cmp_a"
    ].external_clickid_from == ("promo",)


def test_click_ids_need_no_extra_params_and_are_not_repeated_in_the_script_config() -> None:
    c = config(sdk={"extra_params": ["gclid", "rdt_cid"]}, extra_fields=["rdt_cid"])
    assert sdk.script_config(c.campaigns["cmp_a"], c.relay)["extra"] == ["rdt_cid"]
