"""The postback endpoint in-process, fuzzed with the right token: whatever the body or query, the
answer is Pingtree-shaped and never a 5xx. (The real-server behaviour is in test_postbacks.py.)"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import create_app
from server.config import parse_config

TOKEN = "p" * 40
KEYS = {"status", "type", "message", "data", "missingFields", "invalidFields"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    store = tmp_path_factory.mktemp("pb") / "r.sqlite3"
    config = parse_config(
        tomllib.loads(f"""
[relay]
upstream_url = "http://127.0.0.1:9"
store = "sqlite:///{store}"
inline_concurrency = 0
[campaigns.cmp_1.events.call]
conversion = true
[campaigns.cmp_1.postbacks.ringba]
token = "{TOKEN}"
event = "call"
min_duration = 30
duration_param = "duration"
[campaigns.cmp_1.postbacks.ringba.params]
tid = "transaction_id"
payout = "amount"
""")
    )
    application = create_app(config, start_delivery=False)
    yield application
    application.extensions["relay"].close()


names = st.sampled_from(["tid", "payout", "duration", "token", "sub1", "cost", "x"]) | st.text(max_size=6)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
bodies = st.dictionaries(names, scalars | st.lists(scalars, max_size=2), max_size=6).map(
    lambda b: json.dumps(b).encode()
) | st.binary(max_size=120)


@given(
    raw=bodies,
    query=st.dictionaries(names, st.text(max_size=10), max_size=4),
    ctype=st.sampled_from(
        [
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain",
            "",
            "text/xml",
            "multipart/form-data; boundary=x",
        ]
    ),
    method=st.sampled_from(["GET", "POST"]),
)
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_never_a_5xx(app: Flask, raw: bytes, query: dict[str, str], ctype: str, method: str) -> None:
    url = "/postback/cmp_1/ringba?" + urlencode({**query, "token": TOKEN})
    response = app.test_client().open(
        url,
        method=method,
        data=raw if method == "POST" else None,
        headers={"Content-Type": ctype} if method == "POST" else {},
    )
    assert response.status_code < 500, response.get_data(as_text=True)
    assert set(response.get_json()) == KEYS
