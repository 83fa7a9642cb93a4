"""Which build of the relay this is: the version the installed distribution carries.

One source of truth (pyproject.toml's ``version``), read from the package metadata, so
``pingtree-relay --version``, ``/metrics``' ``build_info`` and the OpenAPI description agree.
"""

from __future__ import annotations

import functools
from importlib import metadata

DISTRIBUTION = "pingtree-relay"


@functools.cache
def version() -> str:
    """The installed version, or ``0+unknown`` when running from a checkout that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def store_kind(url: str) -> str:
    """``sqlite`` or ``redis``: the store's scheme, never its path or host (those stay private)."""
    return url.split(":", 1)[0] if url.startswith(("sqlite:", "redis:")) else "other"
