"""The dashboard's postbacks page: each campaign's sources, their URL, and what they sent.

Counts come from the metrics counters (summed over workers like a scrape), because a refused
postback is never stored: the counters are the only record of it, with its reason.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from flask import current_app, render_template, request

from ..postbacks.endpoint import source_url
from ..relay import current_relay
from . import bp


def postback_counts() -> tuple[
    dict[tuple[str, str], dict[str, float]], dict[tuple[str, str], dict[str, float]]
]:
    """Per (cid, source): counts by outcome, and refusals by reason. Empty without the metrics module."""
    metrics = current_app.extensions.get("metrics")
    outcomes: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    reasons: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    if metrics is None:
        return outcomes, reasons
    for labels, value in metrics.samples("pingtree_relay_postbacks"):
        if value:
            outcomes[(labels["cid"], labels["source"])][labels["outcome"]] = value
    for labels, value in metrics.samples("pingtree_relay_postbacks_refused"):
        if value:
            reasons[(labels["cid"], labels["source"])][labels["reason"]] = value
    return outcomes, reasons


@bp.get("/postbacks")
def postbacks() -> str:
    """Postback sources: where to point the platform, and what each one's postbacks became."""
    config = current_relay().config
    base = config.relay.public_url or request.host_url.rstrip("/")
    outcomes, reasons = postback_counts()
    rows: list[dict[str, Any]] = []
    for campaign in config.campaigns.values():
        for source in campaign.postbacks.values():
            key = (campaign.cid, source.name)
            counted = outcomes.get(key, {})
            rows.append(
                {
                    "cid": campaign.cid,
                    "source": source,
                    "url": source_url(base, campaign, source),
                    "accepted": int(sum(n for outcome, n in counted.items() if outcome != "refused")),
                    "refused": int(counted.get("refused", 0)),
                    "outcomes": {k: int(v) for k, v in sorted(counted.items()) if k != "refused"},
                    "reasons": {
                        k: int(v) for k, v in sorted(reasons.get(key, {}).items(), key=lambda kv: -kv[1])
                    },
                }
            )
    # Postbacks to a source (or campaign) that is not configured: counted under "unknown".
    unknown = [
        {"cid": cid, "reasons": {k: int(v) for k, v in sorted(counted.items())}}
        for (cid, source), counted in sorted(reasons.items())
        if source == "unknown"
    ]
    return render_template("admin/postbacks.html", rows=rows, unknown=unknown, page="postbacks")
