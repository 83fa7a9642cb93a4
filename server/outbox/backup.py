"""``pingtree-relay outbox backup``: a consistent copy of the SQLite outbox while the relay runs.

SQLite's online backup API copies the database page by page under a read transaction; in WAL mode
readers never block the writers, so the relay keeps accepting while the copy is made, and the copy
is a snapshot of one moment (never a torn file, as ``cp`` of a live database with its -wal can be).
It is written next to its destination and renamed into place, so a copy cut short is never mistaken
for a good one.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


class BackupError(RuntimeError):
    """The backup cannot be made; the message says why and what to do instead."""


def backup(store_url: str, destination: str | os.PathLike[str]) -> int:
    """Copy the SQLite store at ``store_url`` to ``destination``; returns the number of pages copied."""
    if not store_url.startswith("sqlite:///"):
        raise BackupError(
            "the outbox is in Redis: back it up with Redis's own persistence "
            "(the AOF file, or BGSAVE's dump.rdb); see docs/deployment.md"
        )
    source_path = store_url[len("sqlite:///") :]
    target = Path(destination)
    if target.exists():
        raise BackupError(f"{target} exists already; give a new file name (backups never overwrite)")
    if not Path(source_path).exists():
        raise BackupError(f"no outbox at {source_path}")
    partial = target.with_name(target.name + ".partial")
    pages = 0

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal pages
        pages = total

    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
    copy = sqlite3.connect(partial)
    try:
        # 1024 pages (4 MB) per step: the read transaction is short and the writers barely notice.
        source.backup(copy, pages=1024, progress=progress)
    finally:
        copy.close()
        source.close()
    os.replace(partial, target)
    return pages
