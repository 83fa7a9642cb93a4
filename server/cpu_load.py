"""Is this process short of CPU? The inline attempt's test (server/relay.py).

This process's CPU seconds (``time.process_time``: every thread), read at the start and the end of
an interval: a worker is one GIL, and past half a core it is queueing its own requests behind each
other. The box as a whole (Linux's pressure stall information, ``/proc/pressure/cpu``) was tried as
a second signal and dropped: it counts every task on the box (a test suite, a database, a build),
and on this project's 2-core machine its A/B against the process's share alone was inconclusive
(docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CpuLoad:
    """``busy(share)``: did this process use ``share`` of one core since the previous call? The first
    call only starts the clocks (it answers False)."""

    def __init__(
        self,
        process_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.process_clock, self.wall_clock = process_clock, wall_clock
        self._last: tuple[float, float] | None = None

    def busy(self, share: float) -> bool:
        now = (self.wall_clock(), self.process_clock())
        last, self._last = self._last, now
        if last is None or now[0] <= last[0]:
            return False
        return (now[1] - last[1]) / (now[0] - last[0]) >= share
