"""Configuration: loading, defaults, and check-config naming the offending key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[relay]
upstream_url = "https://api.pingtree.com"
store = "sqlite:///var/relay.sqlite3"
public_url = "https://track.example.com"

[campaigns.cmp_demo]
allowed_origins = ["https://www.example.com", "https://*.webflow.io"]
conversion_timezone = "EST"

[campaigns.cmp_demo.server_fields]
cost = 1.25
cost_operation = "add"

[campaigns.cmp_demo.events.quote_viewed]
[campaigns.cmp_demo.events.sale_completed]
conversion = true
allow_duplicates = false
"""


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "check-config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_issue_example_is_valid(tmp_path: Path) -> None:
    result = check(tmp_path, GOOD)
    assert result.returncode == 0, result.stderr
    assert "OK (1 campaigns, 2 events)" in result.stdout
    config = load_config(tmp_path / "relay.toml")
    assert config.relay.store == f"sqlite:///{(tmp_path / 'var/relay.sqlite3').resolve()}"
    campaign = config.campaigns["cmp_demo"]
    assert campaign.events["sale_completed"].conversion is True
    # Tried inline: conversions unless an event says otherwise (``inline``).
    assert campaign.events["sale_completed"].tried_inline is True
    assert campaign.events["quote_viewed"].tried_inline is False
    assert campaign.server_fields == {"cost": 1.25, "cost_operation": "add"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("conversion = true", 'conversion = "yes"'),
            "campaigns.cmp_demo.events.sale_completed.conversion: expected true or false",
        ),
        (
            ("conversion = true", 'conversion = true\ninline = "always"'),
            "campaigns.cmp_demo.events.sale_completed.inline: expected true or false",
        ),
        (
            ('conversion_timezone = "EST"', 'conversion_timezone = "CET"'),
            "campaigns.cmp_demo.conversion_timezone: unknown timezone",
        ),
        (('upstream_url = "https://api.pingtree.com"\n', ""), "relay.upstream_url: required"),
        (
            ('"https://www.example.com",', '"www.example.com",'),
            "campaigns.cmp_demo.allowed_origins[0]: expected an origin",
        ),
        (
            ('"https://*.webflow.io"', '"https://example.com/path"'),
            "campaigns.cmp_demo.allowed_origins[1]: expected an origin",
        ),
        (
            ("cost = 1.25", "cost = [1]"),
            "campaigns.cmp_demo.server_fields.cost: expected a string or a number",
        ),
        (
            ('cost_operation = "add"', 'cost_operation = "subtract"'),
            "campaigns.cmp_demo.server_fields.cost_operation",
        ),
        (
            ("allow_duplicates = false", "allow_duplicate = false"),
            "campaigns.cmp_demo.events.sale_completed.allow_duplicate: unknown key",
        ),
        (('store = "sqlite:///var/relay.sqlite3"', 'store = "postgres://x"'), "relay.store: expected"),
        (
            ('upstream_url = "https://api.pingtree.com"', 'upstream_url = "ftp://x"'),
            "relay.upstream_url: expected an http(s) URL",
        ),
        (
            ("[campaigns.cmp_demo]", "[campaigns.cmp_demo]\nsecret = 5"),
            "campaigns.cmp_demo.secret: expected a string",
        ),
        (("[relay]", "[relay]\ninline_timeout = -1"), "relay.inline_timeout: expected a number >= 0"),
        (
            ("[relay]", "[relay]\nlease_seconds = 5"),
            "relay.lease_seconds: must be longer than upstream_timeout",
        ),
        (
            (
                "[campaigns.cmp_demo]",
                '[campaigns.cmp_demo.sdk]\nextra_params = ["promo_code"]\n[campaigns.cmp_demo]',
            ),
            "campaigns.cmp_demo.sdk.extra_params: 'promo_code' must also be listed in extra_fields",
        ),
        (("[campaigns.cmp_demo]", "[campaigns.trigger]"), "campaigns.trigger: 'trigger' is reserved"),
        (
            ("[campaigns.cmp_demo]", '[campaigns.cmp_demo]\nexternal_clickid_from = ["gclid", "promo_code"]'),
            "campaigns.cmp_demo.external_clickid_from[1]: 'promo_code' is not a click id",
        ),
        (
            ("[campaigns.cmp_demo]", '[campaigns.cmp_demo]\nexternal_clickid_from = "gclid"'),
            "campaigns.cmp_demo.external_clickid_from: expected a list of strings",
        ),
        (
            ("[campaigns.cmp_demo]", '[campaigns.cmp_demo]\nstaging_origins = ["preview.example.com"]'),
            "campaigns.cmp_demo.staging_origins[0]: expected an origin",
        ),
        (
            ("[relay]", '[relay]\nstaging_upstream_url = "ftp://x"'),
            "relay.staging_upstream_url: expected an http(s) URL",
        ),
        (
            ("[campaigns.cmp_demo]", "[campaigns.cmp_demo.sdk]\nadd_hidden_fields = 1\n[campaigns.cmp_demo]"),
            "campaigns.cmp_demo.sdk.add_hidden_fields: expected true or false",
        ),
        (
            (
                "[campaigns.cmp_demo]",
                '[campaigns.cmp_demo.sdk]\ncookie_domain = "x.com;Secure"\n[campaigns.cmp_demo]',
            ),
            "campaigns.cmp_demo.sdk.cookie_domain: expected a domain",
        ),
        # Values that can never be right.
        (
            ('store = "sqlite:///var/relay.sqlite3"', 'store = "sqlite:///:memory:"'),
            "relay.store: an in-memory SQLite database is private to each thread",
        ),
        (
            ('upstream_url = "https://api.pingtree.com"', 'upstream_url = "http://169.254.169.254/latest"'),
            "relay.upstream_url: 169.254.169.254 is a link-local or cloud metadata address",
        ),
        (
            ('upstream_url = "https://api.pingtree.com"', 'upstream_url = "http://metadata.google.internal"'),
            "relay.upstream_url: metadata.google.internal is a link-local or cloud metadata address",
        ),
        (
            ('upstream_url = "https://api.pingtree.com"', 'upstream_url = "http://[fe80::1]:8080"'),
            "relay.upstream_url: fe80::1 is a link-local",
        ),
        (
            (
                'upstream_url = "https://api.pingtree.com"',
                'upstream_url = "https://api.pingtree.com/api/event"',
            ),
            "relay.upstream_url: give the base URL",
        ),
        (
            ('"https://*.webflow.io"', '"https://*.com"'),
            "campaigns.cmp_demo.allowed_origins[1]: *.com is a public suffix",
        ),
        (
            ('"https://*.webflow.io"', '"https://*.co.uk"'),
            "campaigns.cmp_demo.allowed_origins[1]: *.co.uk is a public suffix",
        ),
        (("[relay]", '[relay]\nadmin_token = "x"'), "relay.admin_token: at least 16 characters"),
        (
            ("[relay]", "[relay]\ndecision_log_limit = -1"),
            "relay.decision_log_limit: expected a whole number >= 0",
        ),
        (
            ("[relay]", '[relay]\ndecision_log_limit = "lots"'),
            "relay.decision_log_limit: expected a whole number",
        ),
        (
            ("[relay]", "[relay]\ninline_timeout = 40"),
            "relay.lease_seconds: must be longer than inline_timeout",
        ),
        (
            ("[campaigns.cmp_demo]", '[campaigns.cmp_demo]\nallow_server_calls = true\nserver_key = "k"'),
            "campaigns.cmp_demo.server_key: at least 16 characters",
        ),
        (
            ("cost = 1.25", 'cost = 1.25\ntransaction_id = "t1"'),
            "campaigns.cmp_demo.server_fields.transaction_id: may not be fixed by the server",
        ),
        (
            ("cost = 1.25", 'cost = 1.25\nconversion_date = "2024-01-01 00:00:00"'),
            "campaigns.cmp_demo.server_fields.conversion_date: may not be fixed by the server",
        ),
        (
            ("cost = 1.25", 'cost = 1.25\n_pt_test = "1"'),
            "campaigns.cmp_demo.server_fields._pt_test: the relay's own key, not a Pingtree field",
        ),
        # A field a campaign lets callers send must not be one only the relay may set.
        *(
            (
                (
                    'conversion_timezone = "EST"',
                    f'conversion_timezone = "EST"\nextra_fields = ["quote_id", "{name}"]',
                ),
                f"campaigns.cmp_demo.extra_fields[1]: '{name}' is not a field a caller may send",
            )
            for name in ("_pt_global_org", "_pt_test", "cost", "ip_address", "event_uuid", "signature")
        ),
        (
            ("allow_duplicates = false", 'allow_duplicates = true\nrevenue = "signed"'),
            'campaigns.cmp_demo.events.sale_completed.revenue: "signed" cannot go with allow_duplicates = true',
        ),
    ],
)
def test_check_config_names_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD
    result = check(tmp_path, GOOD.replace(old, new, 1))
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_not_toml(tmp_path: Path) -> None:
    result = check(tmp_path, "[relay\n")
    assert result.returncode == 1 and "not valid TOML" in result.stderr


def test_missing_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "check-config", str(tmp_path / "nope.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "No such file" in result.stderr


def test_signed_revenue_needs_a_secret() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "relay": {"upstream_url": "http://x"},
                "campaigns": {"c": {"events": {"s": {"conversion": True, "revenue": "signed"}}}},
            }
        )
    assert info.value.path == "campaigns.c.secret"


def test_selector_must_name_an_event() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "relay": {"upstream_url": "http://x"},
                "campaigns": {"c": {"sdk": {"selectors": {"#buy": "nope"}}, "events": {"a": {}}}},
            }
        )
    assert "campaigns.c.sdk.selectors.#buy" in str(info.value)


def test_admin_token_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("PINGTREE_RELAY_ADMIN_TOKEN", "from-env-0123456789")
    assert load_config(path).relay.admin_token == "from-env-0123456789"
    monkeypatch.setenv("PINGTREE_RELAY_ADMIN_TOKEN", "short")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "PINGTREE_RELAY_ADMIN_TOKEN"


@pytest.mark.parametrize(
    ("change", "warning"),
    [
        (
            (
                'upstream_url = "https://api.pingtree.com"',
                'upstream_url = "https://user:pw@api.pingtree.com"',
            ),
            "relay.upstream_url: has credentials in it",
        ),
        (
            (
                "[campaigns.cmp_demo.events.quote_viewed]\n[campaigns.cmp_demo.events.sale_completed]\n"
                "conversion = true\nallow_duplicates = false\n",
                "",
            ),
            "campaigns.cmp_demo.events: none; every event sent to this campaign will be refused",
        ),
        (
            ('allowed_origins = ["https://www.example.com", "https://*.webflow.io"]', "allowed_origins = []"),
            "campaigns.cmp_demo.allowed_origins: none, and allow_server_calls is off",
        ),
        (
            (
                "[campaigns.cmp_demo.events.quote_viewed]",
                '[campaigns.cmp_demo.postbacks.buyer]\ntoken = "' + "t" * 32 + '"\nevent_param = "evt"\n'
                '[campaigns.cmp_demo.postbacks.buyer.params]\ntid = "transaction_id"\n'
                "[campaigns.cmp_demo.events.call_clicked]\nallow_duplicates = true\n"
                "[campaigns.cmp_demo.events.quote_viewed]",
            ),
            "campaigns.cmp_demo.postbacks.buyer.call_id_param: not set, so this source's postbacks for "
            "call_clicked (allow_duplicates) will be refused",
        ),
    ],
)
def test_check_config_warns_on_risky_values_naming_the_key(
    tmp_path: Path, change: tuple[str, str], warning: str
) -> None:
    old, new = change
    assert old in GOOD
    result = check(tmp_path, GOOD.replace(old, new, 1))
    assert result.returncode == 0, result.stderr
    assert f"warning: {warning}" in result.stderr, result.stderr


def test_a_wildcard_on_a_platform_domain_is_a_warning(tmp_path: Path) -> None:
    result = check(tmp_path, GOOD)
    assert result.returncode == 0
    assert (
        "warning: campaigns.cmp_demo.allowed_origins[1]: *.webflow.io is a hosting platform's shared domain"
        in result.stderr
    ), result.stderr


@pytest.mark.parametrize(
    ("store", "where"),
    [
        ("sqlite:///var/relay.sqlite3", "{tmp}/var/relay.sqlite3"),  # three slashes: next to the config file
        ("sqlite:////{tmp}/abs/relay.sqlite3", "/{tmp}/abs/relay.sqlite3"),  # four: absolute
    ],
)
def test_check_config_prints_where_the_store_resolved(tmp_path: Path, store: str, where: str) -> None:
    tmp = str(tmp_path.resolve()).lstrip("/")
    text = GOOD.replace('store = "sqlite:///var/relay.sqlite3"', f'store = "{store.format(tmp=tmp)}"')
    result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    expected = where.format(tmp=tmp)
    expected = expected if expected.startswith("/") else "/" + expected
    assert f"store: SQLite file {expected}\n" in result.stdout, result.stdout


def test_check_config_never_prints_a_redis_password(tmp_path: Path) -> None:
    text = GOOD.replace(
        'store = "sqlite:///var/relay.sqlite3"', 'store = "redis://:hunter2@127.0.0.1:6399/0"'
    )
    result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "store: Redis redis://:***@127.0.0.1:6399/0" in result.stdout and "hunter2" not in result.stdout
