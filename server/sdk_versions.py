"""Which SDK versions pages still load: requests by (campaign, version, state), with last-seen time.

States: ``stable`` (the default tag's URL; it always serves the current build), ``current`` and
``superseded`` (a pinned tag's build, still served) and ``unknown`` (a pinned tag whose build is
unknown or expired: that page's events are lost, the operator must replace the tag).

On the SDK request path this is one dict update under a lock. Under gunicorn every worker counts
for itself, so each one writes its counts to ``seen/HOST-PID-ID.json`` in the archive directory (a
daemon thread, every few seconds, only when something changed) and the dashboard adds up every
file. Files of processes gone for longer than the retention are deleted.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .sdk_archive import RETENTION_SECONDS

STATES = ("stable", "current", "superseded", "unknown")
FLUSH_SECONDS = 5.0


class VersionLog:
    """Counts of SDK requests by (cid, version, state), each with the time it was last seen."""

    def __init__(self, directory: Path | None, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.directory = directory
        self.flush_seconds = flush_seconds
        self._counts: dict[tuple[str, str, str], list[float]] = {}  # key -> [count, last_seen]
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._thread_pid = 0

    def seen(self, cid: str, version: str, state: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            entry = self._counts.setdefault((cid, version, state), [0, now])
            entry[0] += 1
            entry[1] = now
        self._dirty.set()
        if self._thread_pid != os.getpid():  # first request in this (forked) worker
            self._start_flusher()

    def recent(self) -> dict[str, list[dict[str, Any]]]:
        """Per campaign, every (version, state) seen by any process, latest first."""
        self.flush()
        merged: dict[tuple[str, str, str], list[float]] = {}
        for rows in self._files():
            for cid, version, state, count, last in rows:
                entry = merged.setdefault((cid, version, state), [0, 0.0])
                entry[0] += count
                entry[1] = max(entry[1], last)
        if self.directory is None:
            merged = {key: list(value) for key, value in self._snapshot().items()}
        out: dict[str, list[dict[str, Any]]] = {}
        for (cid, version, state), (count, last) in merged.items():
            out.setdefault(cid, []).append(
                {"version": version, "state": state, "count": int(count), "last_seen": last}
            )
        for seen in out.values():
            seen.sort(key=lambda r: r["last_seen"], reverse=True)
        return out

    def flush(self) -> None:
        """Write this process's counts to its file (atomically); quiet when it cannot."""
        if self.directory is None:
            return
        self._dirty.clear()
        rows = [[*key, value[0], value[1]] for key, value in self._snapshot().items()]
        folder = self.directory / "seen"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "w") as out:
                json.dump(rows, out)
            # One file per log (host, process, app): two apps in one process must not overwrite each other.
            os.replace(tmp, folder / f"{socket.gethostname()}-{os.getpid()}-{id(self):x}.json")
        except OSError:
            pass  # the dashboard then shows this worker's counts at its next flush

    def _snapshot(self) -> dict[tuple[str, str, str], list[float]]:
        with self._lock:
            return {key: list(value) for key, value in self._counts.items()}

    def _files(self) -> list[list[list[Any]]]:
        if self.directory is None:
            return []
        now, found = time.time(), []
        for path in (self.directory / "seen").glob("*.json"):
            try:
                if now - path.stat().st_mtime > RETENTION_SECONDS:
                    path.unlink()
                    continue
                rows = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found.append([r for r in rows if isinstance(r, list) and len(r) == 5])
        return found

    def _start_flusher(self) -> None:
        with self._lock:
            if self._thread_pid == os.getpid():
                return
            self._thread_pid = os.getpid()
        if self.directory is not None:
            threading.Thread(target=self._flush_loop, name="sdk-versions", daemon=True).start()

    def _flush_loop(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(self.flush_seconds)  # batch a burst of requests into one write
            self.flush()
