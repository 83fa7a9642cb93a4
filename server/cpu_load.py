"""Is this process, or the box it runs on, short of CPU? The inline attempt's test (server/relay.py).

Two clocks, each read at the start and the end of an interval:

- this process's CPU seconds (``time.process_time``: every thread). A worker is one GIL: past half a
  core it is queueing its own requests behind each other.
- the box's CPU stall seconds: the time during which some task was ready to run and waited for a
  core (Linux's pressure stall information, ``/proc/pressure/cpu``, ``some total``). The process's
  own share cannot show a saturated box: with the workers, the delivery processes, a database and
  whatever else sharing the cores, each gets less than half a core while all of them wait. Where
  there is no PSI (other systems, kernels without it) only the process's own share counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PSI_CPU = "/proc/pressure/cpu"


def box_stall_seconds(path: str = PSI_CPU) -> float | None:
    """Seconds some task on this box has waited for a CPU since boot (``some total``), or None."""
    try:
        with open(path) as file:
            first = file.readline()  # some avg10=0.00 avg60=0.00 avg300=0.00 total=123456
    except OSError:
        return None
    for field in first.split():
        if field.startswith("total="):
            return int(field[len("total=") :]) / 1_000_000
    return None


class CpuLoad:
    """``busy(share)``: did this process use, or the box stall for, ``share`` of the time since the
    previous call? The first call only starts the clocks (it answers False)."""

    def __init__(
        self,
        process_clock: Callable[[], float] = time.process_time,
        stall_clock: Callable[[], float | None] = box_stall_seconds,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process_clock, self._stall_clock, self._wall_clock = process_clock, stall_clock, wall_clock
        self._last: tuple[float, float, float | None] | None = None

    def busy(self, share: float) -> bool:
        now = (self._wall_clock(), self._process_clock(), self._stall_clock())
        last, self._last = self._last, now
        if last is None or now[0] <= last[0]:
            return False
        elapsed = now[0] - last[0]
        if (now[1] - last[1]) / elapsed >= share:
            return True
        return now[2] is not None and last[2] is not None and (now[2] - last[2]) / elapsed >= share
