"""Events per minute for the last hour, by outcome: the geometry of a stacked bar chart.

Pure: :func:`build_chart` turns ``store.timeline(since)`` rows into rectangles and axis ticks; the
template draws them as inline SVG (classes only, colours in the stylesheet: the CSP forbids inline
styles). No chart library, nothing fetched from elsewhere.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from .present import zone

OUTCOMES = ("delivered", "queued", "retrying", "dead")  # bottom to top
MINUTES = 60
WIDTH, HEIGHT = 720, 200
LEFT, BOTTOM, TOP = 36, 22, 8  # room for the y labels, x labels, top tick


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    outcome: str
    title: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str
    anchor: str = "middle"  # SVG text-anchor: the last label ends at the right edge, not past it


@dataclass
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    bars: list[Bar] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    plot_left: int = LEFT
    plot_bottom: int = HEIGHT - BOTTOM


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^n at or above ``value`` (at least 1): a readable axis top."""
    if value <= 1:
        return 1
    magnitude = 10 ** int(math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover


def build_chart(rows: list[tuple[int, str, int]], now: float | None = None) -> Chart:
    """Stacked bars, one per minute of the hour ending at ``now``."""
    now = time.time() if now is None else now
    last_minute = int(now // 60) * 60
    first_minute = last_minute - (MINUTES - 1) * 60
    per_minute: dict[int, dict[str, int]] = defaultdict(dict)
    totals = dict.fromkeys(OUTCOMES, 0)
    for minute, outcome, count in rows:
        if first_minute <= minute <= last_minute and outcome in totals:
            per_minute[minute][outcome] = per_minute[minute].get(outcome, 0) + count
            totals[outcome] += count
    top = nice_ceiling(max((sum(v.values()) for v in per_minute.values()), default=0))
    chart = Chart(totals=totals)
    plot_h = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / MINUTES
    for i in range(MINUTES):
        minute = first_minute + i * 60
        base = float(HEIGHT - BOTTOM)
        for outcome in OUTCOMES:
            count = per_minute.get(minute, {}).get(outcome, 0)
            if not count:
                continue
            h = plot_h * count / top
            base -= h
            label = f"{time.strftime('%H:%M', time.localtime(minute))} {zone(minute)}"
            chart.bars.append(
                Bar(
                    round(LEFT + i * slot + 1, 2),
                    round(base, 2),
                    round(slot - 2, 2),
                    round(h, 2),
                    outcome,
                    f"{label}: {count} {outcome}",
                )
            )
    chart.y_ticks = [Tick(round(HEIGHT - BOTTOM - plot_h * f, 2), _count(top * f)) for f in (0, 0.5, 1)]
    chart.x_ticks = [
        Tick(
            round(LEFT + i * slot + slot / 2, 2),
            time.strftime("%H:%M", time.localtime(first_minute + i * 60)),
        )
        for i in range(0, MINUTES, 15)
    ] + [Tick(WIDTH, "now", "end")]
    # The axis's zone once, on its first tick: the times are the server's clock, not the viewer's.
    first = chart.x_ticks[0]
    chart.x_ticks[0] = Tick(first.position, f"{first.label} {zone(first_minute)}", first.anchor)
    return chart


def _count(value: float) -> str:
    return f"{value:g}"
