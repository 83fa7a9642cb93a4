"""Known automated clients, recognised by their User-Agent. Pure: a string in, a verdict out.

Used only for campaigns with ``bot_filter = true``: their events from such clients are answered
202 (so a crawler or a monitor sees no error and does not retry) but are never stored nor forwarded
to Pingtree, and each is reported on the observer bus as ``filtered`` with ``reason="bot"``.

This is hygiene, not a defence: an attacker sets any User-Agent it likes. It keeps honest robots
(crawlers rendering landing pages, uptime checks, link previews, scripts a developer forgot
about) out of a campaign's conversions. Origins, signatures and rate limits are the defences.
"""

from __future__ import annotations

import re

# Lower-case substrings. Generic words first ("bot" catches Googlebot, bingbot, AdsBot-Google...),
# then tools and services whose User-Agent does not say "bot". Headless browsers are listed
# because a real visitor never runs one; a campaign tested with Playwright leaves bot_filter off.
BOT_MARKERS: tuple[str, ...] = (
    "bot",
    "crawl",
    "spider",
    "slurp",
    "scrapy",
    "archiver",
    "curl/",
    "wget/",
    "libwww-perl",
    "python-requests",
    "python-urllib",
    "python-httpx",
    "aiohttp",
    "go-http-client",
    "java/",
    "okhttp",
    "apache-httpclient",
    "node-fetch",
    "axios/",
    "undici",
    "postmanruntime",
    "insomnia",
    "httpie",
    "headlesschrome",
    "phantomjs",
    "electron/",
    "puppeteer",
    "playwright",
    "selenium",
    "lighthouse",
    "pingdom",
    "uptimerobot",
    "statuscake",
    "site24x7",
    "gtmetrix",
    "facebookexternalhit",
    "mediapartners-google",
    "apis-google",
    "feedfetcher",
    "bingpreview",
    "googleother",
    "google-inspectiontool",
    "whatsapp",
    "preview",
)
_BOT_RE = re.compile("|".join(re.escape(m) for m in BOT_MARKERS))
# Phones whose model names hold a marker: taken out before matching, or a real visitor's event
# (answered 202, never forwarded) would be lost without a trace but a counter. CUBOT's Android UAs
# read "Linux; Android 11; CUBOT X50"; a bot's own name ("Googlebot/2.1") is never one of these.
NOT_BOTS: tuple[str, ...] = ("cubot",)
_NOT_BOTS_RE = re.compile("|".join(rf"(?<![a-z]){re.escape(m)}(?![a-z])" for m in NOT_BOTS))  # CUBOT_P30 too


def bot_marker(user_agent: str | None) -> str | None:
    """The marker that makes ``user_agent`` a known automated client, or None for a browser.

    A missing or blank User-Agent counts as automated: every browser sends one.
    """
    if user_agent is None or not user_agent.strip():
        return "no user agent"
    match = _BOT_RE.search(_NOT_BOTS_RE.sub(" ", user_agent.lower()))
    return match.group(0) if match else None


def is_bot(user_agent: str | None) -> bool:
    """True when ``user_agent`` belongs to a known automated client (see :func:`bot_marker`)."""
    return bot_marker(user_agent) is not None
