"""What ``check-config`` refuses as never right, and what it warns about as risky, naming the key.

Each key's own type and shape is checked in :mod:`server.config`; this module looks at values that
are well-formed but wrong (refused: a :class:`ConfigError`) or allowed but risky (a warning, one
``"key.path: message"`` string; check-config prints them, ``serve`` logs them at start).

The public suffixes below are a small built-in list of common ones, not the whole Public Suffix
List (https://publicsuffix.org): a wildcard origin on one of them is refused, a wildcard on a
hosting platform's shared domain (every customer of the platform has a subdomain) is warned about.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from .config import CampaignConfig, ConfigError, RelayConfig
from .fields import CONTROL_FIELDS, INTERNAL_PREFIX, SERVER_ONLY_FIELDS

MIN_SECRET_LENGTH = 16  # admin_token, server_key: long enough that guessing online is hopeless

# Registries' suffixes: "https://*.com" lets every .com site post.
PUBLIC_SUFFIXES = frozenset(
    {
        "com",
        "net",
        "org",
        "io",
        "co",
        "app",
        "dev",
        "info",
        "biz",
        "us",
        "uk",
        "de",
        "fr",
        "es",
        "it",
        "nl",
        "ca",
        "au",
        "in",
        "br",
        "jp",
        "cn",
        "ru",
        "eu",
        "me",
        "tv",
        "xyz",
        "online",
        "site",
        "store",
        "shop",
        "co.uk",
        "org.uk",
        "ac.uk",
        "gov.uk",
        "com.au",
        "net.au",
        "org.au",
        "co.nz",
        "co.jp",
        "com.br",
        "com.mx",
        "co.in",
        "co.za",
        "com.cn",
        "com.tr",
    }
)
# Hosting platforms' shared domains: "https://*.webflow.io" lets every Webflow site post, the
# merchant's and anyone else's. Sometimes what a merchant wants while a site has no domain of its own.
PLATFORM_SUFFIXES = frozenset(
    {
        "webflow.io",
        "github.io",
        "netlify.app",
        "vercel.app",
        "pages.dev",
        "workers.dev",
        "herokuapp.com",
        "web.app",
        "firebaseapp.com",
        "azurewebsites.net",
        "cloudfront.net",
        "myshopify.com",
        "wixsite.com",
        "squarespace.com",
        "wordpress.com",
        "blogspot.com",
        "onrender.com",
        "fly.dev",
        "glitch.me",
        "carrd.co",
        "framer.website",
        "unbouncepages.com",
        "leadpages.co",
        "clickfunnels.com",
    }
)
# Cloud instance metadata services: an upstream there would hand them every event, and their answers
# (credentials) to whoever reads the relay's logs and dashboard.
METADATA_HOSTS = frozenset(
    {
        "metadata.google.internal",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
        "100.100.100.200",
        "fd00:ec2::254",
    }
)
# Fields the relay itself decides per event: a fixed value in server_fields would be the same for all.
PER_EVENT_FIELDS = {
    "transaction_id": "it identifies the lead of each event",
    "event_id": "it is the event the page fired",
    "conversion_date": "the relay sets it to the moment each event arrives",
    "conversion_timezone": "set the campaign's conversion_timezone instead",
}


def check_relay(relay: RelayConfig) -> list[str]:
    """Refuse (raise) or warn about the [relay] table's values."""
    warnings: list[str] = []
    url = urlsplit(relay.upstream_url)
    host = (url.hostname or "").lower()
    if host in METADATA_HOSTS or _link_local(host):
        raise ConfigError(
            "relay.upstream_url", f"{host} is a link-local or cloud metadata address, never Pingtree"
        )
    if url.path.rstrip("/").endswith("/api/event") or "/api/event/" in url.path:
        raise ConfigError(
            "relay.upstream_url",
            "give the base URL (e.g. https://api.pingtree.com): the relay appends /api/event/{cid} itself",
        )
    if url.username is not None or url.password is not None:
        warnings.append(
            "relay.upstream_url: has credentials in it; they end up in logs and error messages, "
            "and Pingtree's Event Postback API does not use them"
        )
    if relay.admin_token and len(relay.admin_token) < MIN_SECRET_LENGTH:
        raise ConfigError("relay.admin_token", _too_short())
    return warnings


def check_campaigns(campaigns: Mapping[str, CampaignConfig]) -> list[str]:
    """Refuse (raise) or warn about each campaign's values."""
    warnings: list[str] = []
    for cid, campaign in campaigns.items():
        path = f"campaigns.{cid}"
        for name, why in PER_EVENT_FIELDS.items():
            if name in campaign.server_fields:
                raise ConfigError(f"{path}.server_fields.{name}", f"may not be fixed by the server: {why}")
        for name in campaign.server_fields:
            if name.startswith(INTERNAL_PREFIX):
                raise ConfigError(f"{path}.server_fields.{name}", "the relay's own key, not a Pingtree field")
        for i, name in enumerate(campaign.extra_fields):
            # Each would let a caller set what only the relay may (a cost, the relay's routing note or
            # test flag), or hide a key that validation reads itself.
            if name.startswith(INTERNAL_PREFIX) or name in SERVER_ONLY_FIELDS or name in CONTROL_FIELDS:
                raise ConfigError(
                    f"{path}.extra_fields[{i}]",
                    f"{name!r} is not a field a caller may send (server-only, the relay's own, or a control field)",
                )
        multi = sorted(e for e, ev in campaign.events.items() if ev.allow_duplicates)
        for name, source in campaign.postbacks.items():
            if source.event_param and not source.call_id_param and multi:
                warnings.append(
                    f"{path}.postbacks.{name}.call_id_param: not set, so this source's postbacks for "
                    f"{', '.join(multi)} (allow_duplicates) will be refused: nothing tells a second call "
                    "from a retry of the first"
                )
        if campaign.server_key and len(campaign.server_key) < MIN_SECRET_LENGTH:
            raise ConfigError(f"{path}.server_key", _too_short())
        for i, origin in enumerate(campaign.allowed_origins):
            warnings += _check_wildcard(f"{path}.allowed_origins[{i}]", origin)
        if not campaign.events:
            warnings.append(f"{path}.events: none; every event sent to this campaign will be refused")
        if not campaign.allowed_origins and not campaign.allow_server_calls:
            warnings.append(
                f"{path}.allowed_origins: none, and allow_server_calls is off; nothing can post "
                "events to this campaign"
            )
    return warnings


def _check_wildcard(path: str, origin: str) -> list[str]:
    if "://*." not in origin:
        return []
    domain = origin.split("://*.", 1)[1].split(":", 1)[0]
    if domain in PUBLIC_SUFFIXES or ("." not in domain and domain != "localhost"):
        raise ConfigError(path, f"*.{domain} is a public suffix: every site under it could post events")
    if domain in PLATFORM_SUFFIXES:
        return [
            f"{path}: *.{domain} is a hosting platform's shared domain: any of its sites, not only yours, "
            "may post events for this campaign"
        ]
    return []


def _link_local(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_link_local


def _too_short() -> str:
    return (
        f"at least {MIN_SECRET_LENGTH} characters; make one with "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )
