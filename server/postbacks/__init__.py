"""Conversions that happen off the page: postbacks from call-tracking platforms and buyers.

``GET|POST /postback/{cid}/{source}`` (:mod:`.endpoint`) turns a platform's parameters into a
Pingtree event (:mod:`.mapping`, pure) and hands it to the same accept path as a browser's event,
so durability, retries, deduplication, metrics and the dashboard apply unchanged. Sources are
configured per campaign under ``[campaigns.{cid}.postbacks.{source}]``; see docs/postbacks.md.
"""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the postback endpoint."""
    from .endpoint import bp

    app.register_blueprint(bp)
