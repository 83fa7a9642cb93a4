"""Instructions per accepted event: the accept path in process, counted by valgrind's callgrind.

Wall-clock figures on a shared 2-core host move 10-20 % between rounds; an instruction count of the
same work repeats to about 1.5 % (the log writer's thread batches lines a little differently each
run). So a change to the accept path is measured here first: the app as a worker builds it (the
bench campaign, a real SQLite store, multiprocess metrics, the heap frozen, every decision line
written), ``N`` events through
``app.wsgi_app`` with the body under ``worker.WHOLE_BODY`` as the relay's worker hands it over,
each a 202 from the store (no inline attempt, nothing delivered). Run once with ``N`` events and
once with none, under callgrind, one after the other; the difference over ``N`` is what one event
costs, start-up and warm-up cancelled out.

    python -m bench.instructions            # 300 events, about a minute; needs valgrind (Debian: valgrind)
    python -m bench.instructions --events 1000 --keep DIR   # the callgrind files stay in DIR

``callgrind_annotate --tree=caller DIR/callgrind-N.out`` then says who called what, with counts:
how the exceptions built and dropped in C were found (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from werkzeug.test import EnvironBuilder

from . import servers

WARM_UP = 50  # events before counting starts: first-request paths, caches, the writer thread


def _environ_template() -> dict[str, Any]:
    """An event POST's environ as werkzeug's test client builds it, made once: each event gets a
    copy with its own body (building one per event would be counted as the relay's)."""
    return EnvironBuilder(
        path=f"/api/event/{servers.CID}",
        method="POST",
        base_url="http://127.0.0.1:8000",
        content_type="text/plain;charset=UTF-8",
        headers={"Origin": servers.ORIGIN, "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) bench"},
        environ_base={"REMOTE_ADDR": "127.0.0.1", "wsgi.multithread": True, "wsgi.multiprocess": True},
    ).get_environ()


def _with_body(template: dict[str, Any], body: bytes) -> dict[str, Any]:
    """``template`` with ``body``, as the relay's worker hands it over (``WHOLE_BODY`` beside the stream)."""
    from server.worker import WHOLE_BODY

    return {
        **template,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        WHOLE_BODY: body,
    }


def _body(n: int) -> bytes:
    """Event ``n``: the same bytes in every run (no random ids), a new event each time."""
    return json.dumps(
        {
            "event_id": "quote_viewed",
            "transaction_id": f"t{n:08d}",
            "event_uuid": f"00000000-0000-4000-8000-{n:012d}",
            "utm_source": "google",
            "sub1": "abc",
        }
    ).encode()


def drive(events: int, workdir: Path) -> Counter[str]:
    """Build the app in ``workdir`` and post ``WARM_UP`` then ``events`` events: the answers' statuses."""
    from server import create_app, load_config
    from server.heap import freeze_what_is_loaded

    config = servers.write_config(
        workdir / "relay.toml",
        upstream="http://127.0.0.1:9",
        store=f"sqlite:///{workdir / 'outbox.sqlite3'}",
        # Every decision line written: the default limit is per second of wall-clock time, which
        # callgrind stretches 50-fold, so the count would depend on the machine's speed.
        decision_log_limit=0,
    )
    app = create_app(load_config(config), start_delivery=False)
    statuses: Counter[str] = Counter()

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        statuses[status.split()[0]] += 1

    template = _environ_template()

    def post(n: int) -> None:
        b"".join(app.wsgi_app(_with_body(template, _body(n)), start_response))

    try:
        for n in range(WARM_UP):
            post(n)
        freeze_what_is_loaded()  # as the worker does once its app is built
        statuses.clear()
        for n in range(WARM_UP, WARM_UP + events):
            post(n)
    finally:
        app.extensions["relay"].close()
    return statuses


def _count(events: int, workdir: Path) -> int:
    """Instructions of a whole process that drives ``events`` events (callgrind's total)."""
    run = workdir / f"run-{events}"
    run.mkdir()
    (run / "metrics").mkdir()
    out = workdir / f"callgrind-{events}.out"
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.instructions",
            "--drive",
            str(events),
            str(run),
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(run / "metrics")},
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def _positive(text: str) -> int:
    """An --events value: a whole number of at least 1 (the count is divided by it)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of events, at least 1, not {text!r}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=_positive, default=300, help="events counted (default 300)")
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this folder")
    parser.add_argument("--drive", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.drive:
        statuses = drive(int(args.drive[0]), Path(args.drive[1]))
        if set(statuses) - {"202"}:
            print(f"expected only 202 answers, got {dict(statuses)}", file=sys.stderr)
            return 1
        return 0
    if shutil.which("valgrind") is None:
        print("needs valgrind (Debian: apt-get install -y valgrind)", file=sys.stderr)
        return 2
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="pingtree-relay-instructions-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        counted, baseline = _count(args.events, workdir), _count(0, workdir)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{(counted - baseline) / args.events:,.0f} instructions per accepted event ({args.events} events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
