"""Ad platforms' click ids: the one list the SDK captures and the relay accepts, and the mapping
that fills Pingtree's ``external_clickid`` from them. Pure.

A click id is attribution, not a price: every campaign accepts each of them with no configuration,
and forwards it to Pingtree as a lead field under its own name (Pingtree's lead fields include
``gclid``, ``fbclid`` and ``ttclid``). The SDK's template receives this list (``click_ids``), so
what the browser captures and what the server accepts cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# In the order that fills external_clickid by default: the first one an event carries wins.
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

EXTERNAL_CLICKID = "external_clickid"


def with_external_clickid(fields: Mapping[str, Any], order: Iterable[str]) -> dict[str, Any]:
    """``fields`` with ``external_clickid`` set from the first of ``order`` present, unless it is set.

    The landing URL's own ``external_clickid`` (kept by the SDK like any attribution) always wins;
    an empty ``order`` (``external_clickid_from = []``) turns the mapping off.
    """
    out = dict(fields)
    if out.get(EXTERNAL_CLICKID):
        return out
    for name in order:
        if out.get(name):
            out[EXTERNAL_CLICKID] = out[name]
            break
    return out
