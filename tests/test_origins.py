"""Origin matching (pure): exact origins, wildcard subdomains, and malformed hosts refused."""

from __future__ import annotations

import pytest

from server.origins import origin_allowed, well_formed_origin

ALLOWED = ("https://www.example.com", "https://*.webflow.io", "http://127.0.0.1:8000")


@pytest.mark.parametrize(
    "origin",
    [
        "https://www.example.com",
        "https://shop.webflow.io",
        "https://a.b-c.webflow.io",
        "http://127.0.0.1:8000",
    ],
)
def test_allowed(origin: str) -> None:
    assert origin_allowed(origin, ALLOWED)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.com?.webflow.io",  # a query-looking host: once matched *.webflow.io
        "https://evil.com#.webflow.io",
        "https://user@evil.com.webflow.io",
        "https://user:pw@shop.webflow.io",
        "https://evil .webflow.io",
        "https://evil.com/.webflow.io",
        "https://evil.com\\.webflow.io",
        "https://shop.webflow.io:443",  # the port must match the pattern's (none)
        "https://-bad.webflow.io",
        "https://shop..webflow.io",
        "https://webflow.io",
        "https://evilwebflow.io",
        "https://www.example.com/",
        "https://WWW.EXAMPLE.COM",  # browsers send lower case; anything else was not sent by one
        "https://www.example.com\r\nX-Evil: 1",
        "https://ｗｗｗ.example.com",
        "null",
        "",
        None,
    ],
)
def test_refused(origin: str | None) -> None:
    assert not origin_allowed(origin, ALLOWED)


def test_only_well_formed_origins_may_be_echoed() -> None:
    assert well_formed_origin("https://not-allowed.example.net")
    assert not well_formed_origin("https://evil.com?.webflow.io")
    assert not well_formed_origin("https://a.example.com/" + "x" * 400)
