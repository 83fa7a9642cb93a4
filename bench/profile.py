"""py-spy profiles of live relay workers, summarised for docs/benchmarks.md.

``record`` samples every process for a few seconds and merges the stacks. ``--gil``: only the
thread holding the GIL is sampled, so the samples are where the Python CPU time goes, and their
count says how busy each worker's GIL was (a worker can never use more than one core of Python).
``--nonblocking``: the workers are not paused to be sampled. ``dump`` takes one snapshot of every
thread: where they wait. The raw stacks stay in bench/results/profiles/ for a flame graph.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Leaf functions that mean "waiting", not computing (a thread can be caught there releasing the GIL).
_WAITING = frozenset(
    {
        "select",
        "poll",
        "wait",
        "dequeue",
        "read",
        "recv",
        "recv_into",
        "readinto",
        "acquire",
        "sleep",
        "accept",
        "get",
        "_wait_for_tstate_lock",
        "is_socket_readable",
    }
)


def _waiting(frame: str) -> bool:
    return frame.split(" (", 1)[0].rsplit(".", 1)[-1] in _WAITING


def py_spy() -> str:
    """The py-spy next to this Python (the venv's), else on PATH; RuntimeError when absent."""
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if local.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy not installed (pip install py-spy)")
    return found


def start_record(
    pids: list[int], seconds: float, out_dir: Path, label: str, rate: int = 100
) -> list[subprocess.Popen[bytes]]:
    """Start one ``py-spy record`` per pid (they run for ``seconds``); pass the result to :func:`finish`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                py_spy(),
                "record",
                "--gil",
                "--nonblocking",
                "-p",
                str(pid),
                "-d",
                f"{max(1, round(seconds))}",
                "-r",
                str(rate),
                "-f",
                "raw",
                "-o",
                str(out_dir / f"{label}-{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


def finish(
    procs: list[subprocess.Popen[bytes]], out_dir: Path, label: str, seconds: float, rate: int = 100
) -> dict[str, Any]:
    """Wait for the recorders; the merged summary plus each worker's GIL-busy share."""
    for proc in procs:
        proc.wait(timeout=120)
    paths = sorted(out_dir.glob(f"{label}-*.txt"))
    possible = max(1, round(seconds)) * rate
    gil = [round(100 * sum(parse_raw(p.read_text(errors="replace")).values()) / possible) for p in paths]
    return {**summarise(paths), "gil_busy_percent": gil}


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) format: ``frame;frame;... count`` per line -> stack counts."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def function(frame: str) -> str:
    """``name (path/file.py:12)`` -> ``name (file.py)``: line numbers would split one function."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).rsplit('site-packages/', 1)[-1]})"


def summarise(paths: list[Path], top: int = 12) -> dict[str, Any]:
    """Merged samples of ``paths``: share waiting, and the top functions by self and inclusive time
    among the samples that were not waiting."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in paths:
        stacks += parse_raw(path.read_text(errors="replace"))
    total = sum(stacks.values())
    busy = {s: n for s, n in stacks.items() if not _waiting(s[-1])}
    busy_total = sum(busy.values())
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, n in busy.items():
        own[function(stack[-1])] += n
        for name in {function(f) for f in stack}:
            inclusive[name] += n
    pct = lambda n: round(100 * n / busy_total, 1) if busy_total else 0.0  # noqa: E731
    return {
        "samples": total,
        "busy_samples": busy_total,
        "waiting_percent": round(100 * (total - busy_total) / total, 1) if total else 0.0,
        "self": [[name, pct(n)] for name, n in own.most_common(top)],
        "inclusive": [
            [name, pct(n)]
            for name, n in inclusive.most_common(top * 3)
            if not name.startswith(("<module>", "_run_", "run (", "main (", "Thread.", "_bootstrap"))
        ][:top],
    }


def dump(pid: int) -> dict[str, Any]:
    """One ``py-spy dump``: how many threads are in each innermost frame right now."""
    out = subprocess.run(
        [py_spy(), "dump", "--nonblocking", "-p", str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return summarise_dump(out)


def summarise_dump(text: str) -> dict[str, Any]:
    """Threads by innermost frame (and the frame below it, which often says why it waits)."""
    where: Counter[str] = Counter()
    threads = 0
    frames: list[str] = []
    state = ""
    for line in [*text.splitlines(), "Thread end"]:
        if line.startswith("Thread "):
            if frames:
                threads += 1
                where[f"{state}: " + " <- ".join(function(f) for f in frames[:2])] += 1
            frames = []
            state = line[line.find("(") + 1 : line.find(")")] if "(" in line else ""
        elif line.startswith("    ") and not line.startswith("        ") and "(" in line:
            frames.append(line.strip())
    return {"threads": threads, "where": where.most_common(8)}
