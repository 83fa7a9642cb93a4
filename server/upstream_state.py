"""What Pingtree said last, for the whole box: every worker (and delivery process) of one ``serve``.

``/readyz`` is answered by whichever worker the load balancer reaches; each worker's own latest
attempt would make the answer flip between workers (one saw a 200 a second ago, another a timeout
ten minutes ago). So each attempt's outcome is also written to one small JSON file in serve's
per-run directory (the one its processes share for metrics files, removed at a clean stop), and
``/readyz`` reads that. Outside ``serve`` (tests, the one-process demo) it stays in memory.

Writes are throttled: a process writes when the outcome changes or once a second while it stays
the same (at most ten times a second in any case), so a thousand deliveries a second cost a few
small writes, and the file is at most about a second behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import NamedTuple

FILE_NAME = "upstream.json"
REFRESH_SECONDS = 1.0
MIN_INTERVAL_SECONDS = 0.1


class Outcome(NamedTuple):
    at: float  # Unix time of the attempt
    answered: bool  # Pingtree answered below 500
    detail: str  # "HTTP 200", "connect: ConnectError", ...


def shared_dir() -> str | None:
    """serve's per-run directory shared by its processes (see server.wsgi.metrics_dir), if any."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class UpstreamState:
    """The latest :class:`Outcome` of any attempt on this box (or in this process, without a directory)."""

    def __init__(self, directory: str | None = None) -> None:
        self.path = os.path.join(directory, FILE_NAME) if directory else None
        self.last: Outcome | None = None  # this process's own latest
        self._written: Outcome | None = None
        self._lock = threading.Lock()

    def record(self, answered: bool, detail: str) -> None:
        outcome = Outcome(time.time(), answered, detail)
        self.last = outcome
        if self.path is None:
            return
        with self._lock:
            written = self._written
            if written is not None:
                since = outcome.at - written.at
                if since < MIN_INTERVAL_SECONDS or (
                    since < REFRESH_SECONDS and written.answered == answered and written.detail == detail
                ):
                    return
            self._written = outcome
        self._write(outcome)

    def _write(self, outcome: Outcome) -> None:
        assert self.path is not None
        directory = os.path.dirname(self.path)
        try:
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=".upstream-", suffix=".tmp")
            with os.fdopen(fd, "w") as file:
                json.dump(outcome._asdict(), file)
            os.replace(temporary, self.path)  # readers see the old file or the new one, never half
        except OSError:
            pass  # the run directory went away (the master is stopping): readiness is moot

    def read(self) -> Outcome | None:
        """The box's latest outcome; this process's own when there is no shared file (yet)."""
        if self.path is None:
            return self.last
        try:
            with open(self.path) as file:
                data = json.load(file)
            shared = Outcome(float(data["at"]), bool(data["answered"]), str(data["detail"]))
        except (OSError, ValueError, KeyError, TypeError):
            return self.last
        if self.last is not None and self.last.at > shared.at:
            return self.last  # ours is newer than the file (a write throttled away)
        return shared


def latest(*outcomes: tuple[float, bool, str] | None) -> Outcome | None:
    """The newest of several outcomes (this process's forwarders, the box's file), or None."""
    seen = [Outcome(*o) for o in outcomes if o]
    return max(seen) if seen else None
