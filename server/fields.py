"""Pingtree's field model: every field name, value list and pattern the relay knows, in one place.

Plain data, no imports from the rest of the package: config, validation, enrichment, the sandbox's
rules, the OpenAPI description and the SDK's script config all read these, so what the browser
captures, what the server accepts, what the sandbox checks and what the document says cannot drift
apart (``tests/test_fields.py`` checks the document against the validator).
"""

from __future__ import annotations

from decimal import Decimal

# The tables keep the grouping of Pingtree's docs (sub1-5 on one line, a comment per click id).
# fmt: off
# Attribution Pingtree takes on every event; the SDK captures each from the landing URL.
ATTRIBUTION_FIELDS: tuple[str, ...] = (
    "pid", "clid",
    "sub1", "sub2", "sub3", "sub4", "sub5",
    "adv1", "adv2", "adv3", "adv4", "adv5",
    "utm_source", "utm_medium", "utm_campaign", "utm_adgroup", "utm_matchtype",
    "utm_term", "utm_content", "utm_creative", "utm_placement",
    "external_clickid",
)
# Landing-URL parameters the SDK keeps: the attribution and the lead's own id.
URL_PARAMS: tuple[str, ...] = ("transaction_id", *ATTRIBUTION_FIELDS)

# Ad platforms' click ids, in the order that fills external_clickid by default: the first one an
# event carries wins. Click ids are attribution, not prices: every campaign accepts them with no
# configuration (Pingtree's lead fields include gclid, fbclid and ttclid).
CLICK_IDS: tuple[str, ...] = (
    "gclid",      # Google Ads
    "gbraid",     # Google Ads, iOS app-to-web
    "wbraid",     # Google Ads, iOS web-to-app
    "fbclid",     # Meta (Facebook, Instagram)
    "msclkid",    # Microsoft Advertising (Bing)
    "ttclid",     # TikTok
    "li_fat_id",  # LinkedIn
    "twclid",     # X (Twitter)
    "ScCid",      # Snapchat (case as Snapchat sends it)
    "irclickid",  # impact.com
    "dclid",      # Google Display & Video 360 / Campaign Manager 360
)
# Others (Pinterest's epik, Reddit's rdt_cid, ...) are a campaign's sdk.extra_params + extra_fields:
# every name here costs bytes in every visitor's download of the SDK.

# Lead fields Pingtree documents for external forms and lead posts (its gclid, fbclid and ttclid are
# among the CLICK_IDS); anything else must be listed in the campaign's extra_fields.
LEAD_FIELDS: tuple[str, ...] = (
    "first_name", "last_name", "email", "phone", "address", "city", "state", "zip",
    "jornaya", "xxTrustedFormCertUrl",
    "trustedFormCertUrl", "trustedFormToken", "trustedFormPingUrl", "econsent_company_id",
)
CONSENT_FIELDS: tuple[str, ...] = ("tcpa_consent", "tcpa_consent_date")

# The request's own keys: ids, revenue and its signature, read by validation itself, never forwarded as-is.
CONTROL_FIELDS = frozenset({"cid", "event_id", "transaction_id", "event_uuid", "amount", "revenue", "signature"})
# The relay's own notes in a stored payload (server/upstream.py's route, server/staging.py's test
# flag) start with this: never a field a caller may send, nor one a campaign may add.
INTERNAL_PREFIX = "_pt_"
# What any caller, the browser included, may send with no configuration.
BROWSER_FIELDS = frozenset(ATTRIBUTION_FIELDS) | frozenset(LEAD_FIELDS) | frozenset(CLICK_IDS) | frozenset(
    CONSENT_FIELDS)

# Money Pingtree takes as a number; set by the server (or a trusted caller) only.
COST_FIELDS: tuple[str, ...] = ("cost", "adSpend", "min_price")
COST_OPERATIONS: tuple[str, ...] = ("add", "substract", "override")  # sic: Pingtree's spelling
# The moment of a conversion: always the relay's own (when it received the event).
CONVERSION_TIME_FIELDS: tuple[str, ...] = ("conversion_date", "conversion_timezone")
# The visitor's address and browser: the relay reads them off the request; a backend may pass them.
VISITOR_FIELDS: tuple[str, ...] = ("ip_address", "user_agent")
# Fields only the server may decide: the browser is untrusted and must not set prices or costs.
SERVER_ONLY_FIELDS = frozenset({*COST_FIELDS, "cost_operation", *CONVERSION_TIME_FIELDS, *VISITOR_FIELDS})

# Pingtree's conversion_timezone values are fixed UTC offsets (hours), not IANA zones:
# they never shift for daylight saving.
TIMEZONES: dict[str, int] = {
    "PST": -8, "EST": -5, "CST": -6, "MST": -7, "AKST": -9, "SST": -11, "HST": -10, "AST": -4,
}

# fmt: on

# Patterns as strings, valid both as Python regexes and as OpenAPI (ECMA-262) patterns.
# [0-9], not \d: Python's \d also matches other scripts' digits ("١٢" would pass as 12).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # a campaign id, event name, source or config identifier
UUID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"  # an event_uuid or Idempotency-Key
UUID_HINT = "8-64 letters, digits, '-' or '_'"  # what UUID_PATTERN asks for, in words
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"  # tcpa_consent_date
# Pingtree's conversion_date: a date, or a date and a time (the sandbox checks what it receives).
CONVERSION_DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}( \d{2}:\d{2}:\d{2})?$"

MAX_FIELDS = 64
MAX_STRING = 255
MAX_ID = 128
MAX_USER_AGENT = 512  # what the relay forwards of a browser's own User-Agent header
MAX_REVENUE = Decimal("1000000000")  # a revenue or cost above this is a typo, not a sale


def _money_pattern(bound: Decimal) -> str:
    """A non-negative number with at most 2 decimals and at most ``bound`` (a power of ten), as a pattern.

    A string revenue is checked by this pattern alone, so that the OpenAPI document (where a
    ``maximum`` binds numbers only) can state the very same rule: below the bound any integer part
    of fewer digits (one more with a leading zero), or the bound itself with zero cents.
    """
    digits = len(str(int(bound))) - 1
    if bound != 10**digits:
        raise ValueError(f"the money bound must be a power of ten, not {bound}")
    below = rf"(?:[0-9]{{1,{digits}}}|0[0-9]{{{digits}}})(?:\.[0-9]{{1,2}})?"
    return rf"^(?:{below}|{int(bound)}(?:\.00?)?)$"


MONEY_PATTERN = _money_pattern(MAX_REVENUE)  # a revenue or cost given as a string
