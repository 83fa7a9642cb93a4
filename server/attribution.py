"""Ad platforms' click ids (the one list, ``CLICK_IDS``, lives in server/fields.py) and the mapping
that fills Pingtree's ``external_clickid`` from them. Pure.

A click id is attribution, not a price: every campaign accepts each of them with no configuration,
and forwards it to Pingtree as a lead field under its own name (Pingtree's lead fields include
``gclid``, ``fbclid`` and ``ttclid``). The SDK's template receives this list (``click_ids``), so
what the browser captures and what the server accepts cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .fields import CLICK_IDS

EXTERNAL_CLICKID = "external_clickid"

__all__ = ["CLICK_IDS", "EXTERNAL_CLICKID", "with_external_clickid"]


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
