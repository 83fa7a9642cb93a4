"""The SDK builds a pinned (``--integrity``) tag may still ask for, kept after they are superseded.

A pinned tag names one build by its content (``/sdk/CID/v/VERSION.js``, VERSION = the first 16 hex
digits of the body's SHA-256) and carries its SRI hash: only those exact bytes will run. A config
change or an upgrade makes a new build, and a page pasted months ago still asks for the old one.
So every build the relay serves as current, or ``snippet --integrity`` prints, is written here as
one file ``CID.VERSION.js`` holding the script body itself (not its config: a new template would
render an old config into different bytes). Files are content-addressed, so workers, nodes and the
CLI may all write the same file: the write is atomic (temp file + rename) and always identical.

Retention: a file's mtime is the last time its build was current (the serving process touches it
at most hourly), and a build stays servable for :data:`RETENTION_DAYS` after that. Older files are
deleted when an app starts. Nothing here may break serving: a directory that cannot be written
only costs the old builds (logged once).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .config import Config

log = logging.getLogger("pingtree_relay.sdk")

RETENTION_DAYS = 30
RETENTION_SECONDS = RETENTION_DAYS * 86400
TOUCH_SECONDS = 3600.0  # how often the current build's file is marked as still current
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_CACHED = 64  # superseded bodies kept in memory per process


def version_of(body: bytes) -> str:
    """The content address of a build: 16 hex digits of SHA-256 (64 bits: no accidental collision)."""
    return hashlib.sha256(body).hexdigest()[:16]


def default_dir(config: Config) -> Path:
    """``relay.sdk_archive_dir``, else ``sdk-builds/`` beside the SQLite file or the config file."""
    relay = config.relay
    if relay.sdk_archive_dir:
        return Path(relay.sdk_archive_dir)
    if relay.store.startswith("sqlite:///") and relay.store != "sqlite:///:memory:":
        return Path(relay.store[len("sqlite:///") :]).parent / "sdk-builds"
    source = Path(config.source)
    if source.is_file():
        return source.parent / "sdk-builds"
    return Path(tempfile.gettempdir()) / "pingtree-relay-sdk-builds"


class BuildArchive:
    """Script bodies by (campaign, version), on disk with a small in-memory cache."""

    def __init__(self, directory: Path, retention_seconds: float = RETENTION_SECONDS) -> None:
        self.directory = directory
        self.retention_seconds = retention_seconds
        self._touched: dict[tuple[str, str], float] = {}  # when this process last marked a build current
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._broken = False

    def path(self, cid: str, version: str) -> Path:
        return self.directory / f"{cid}.{version}.js"

    def remember(self, cid: str, version: str, body: bytes, now: float | None = None) -> None:
        """Record ``body`` (whose :func:`version_of` is ``version``) as the campaign's current build.

        On every script request: cheap when nothing is due (one dict read, no hashing).
        """
        now = time.time() if now is None else now
        key = (cid, version)
        if now - self._touched.get(key, -TOUCH_SECONDS) < TOUCH_SECONDS:
            return
        self._touched[key] = now  # first, so concurrent requests do not all write
        try:
            path = self.path(*key)
            if path.exists():
                os.utime(path, (now, now))
            else:
                self._write(path, body, now)
        except OSError as exc:
            self._warn_once(exc)

    def get(self, cid: str, version: str, now: float | None = None) -> bytes | None:
        """The body of build ``version`` if it is kept and not expired, else None."""
        if not VERSION_RE.match(version):
            return None
        now = time.time() if now is None else now
        key = (cid, version)
        path = self.path(cid, version)
        try:
            if now - path.stat().st_mtime > self.retention_seconds:
                return None
        except OSError:
            return None
        with self._lock:
            body = self._cache.get(key)
            if body is not None:
                self._cache.move_to_end(key)
                return body
        try:
            body = path.read_bytes()
        except OSError:
            return None
        if version_of(body) != version:  # a damaged file must not be served under this name
            return None
        with self._lock:
            self._cache[key] = body
            while len(self._cache) > _CACHED:
                self._cache.popitem(last=False)
        return body

    def prune(self, now: float | None = None) -> int:
        """Delete builds not current for longer than the retention; returns how many."""
        now = time.time() if now is None else now
        removed = 0
        for path in self.directory.glob("*.js"):
            try:
                if now - path.stat().st_mtime > self.retention_seconds:
                    path.unlink()
                    removed += 1
            except OSError:
                continue  # another worker pruned it first
        return removed

    def _write(self, path: Path, body: bytes, now: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".js")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            os.utime(tmp, (now, now))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _warn_once(self, exc: OSError) -> None:
        if not self._broken:
            self._broken = True
            log.warning(
                "SDK builds cannot be kept in %s (%s): pinned tags will break at the next "
                "config change; set relay.sdk_archive_dir",
                self.directory,
                exc,
            )
