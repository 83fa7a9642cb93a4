"""Structured logs: one JSON line per decision, with a request id, no payload and no full IP."""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from server import create_app
from server.config import parse_config
from server.jsonlog import utc_timestamp
from server.logs import mask_ip
from tests.conftest import RelayFactory, wait_for

REPO = Path(__file__).resolve().parent.parent
VISITOR_IP = "203.0.113.77"
MARKER = "PAYLOAD-MARKER-5f1c"  # a value that must never appear in a log


def _capture_stderr(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``sys.stderr`` replaced by a stream that keeps each write, in order, in the list returned."""
    writes: list[str] = []

    class Stderr:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", Stderr())
    return writes


def decision_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON decision lines of a server log (gunicorn's own lines are plain text)."""
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            if line.get("event") in ("accepted", "rejected", "delivery", "filtered"):
                lines.append(line)
    return lines


@pytest.mark.slow
def test_one_line_per_decision(relay_factory: RelayFactory) -> None:
    relay = relay_factory(trusted_proxy_hops=1)
    proxy = {"X-Forwarded-For": VISITOR_IP}
    first = relay.post(
        {"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex, "sub1": MARKER},
        headers={**proxy, "X-Request-Id": "lb-7f3a9c21-0001"},
    )
    second = relay.post(
        {"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex, "sub2": MARKER},
        headers={**proxy, "X-Request-Id": '{"injected": true}'},
    )
    refused = relay.post({"event_id": "nope", "transaction_id": MARKER}, headers=proxy)
    assert (first.status_code, second.status_code, refused.status_code) == (200, 200, 400)
    assert first.headers["X-Request-Id"] == "lb-7f3a9c21-0001"  # a sane incoming id is kept
    generated = second.headers["X-Request-Id"]
    assert generated != '{"injected": true}' and len(generated) == 32  # an insane one is replaced

    lines = wait_for(
        lambda: (ls := decision_lines(relay.log_path)) and len(ls) >= 5 and ls, message="5 decision lines"
    )
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_kind.setdefault(line["event"], []).append(line)
    # Two accepted, one refused, one delivery attempt per accepted event (inline, inside the request).
    assert {k: len(v) for k, v in by_kind.items()} == {"accepted": 2, "rejected": 1, "delivery": 2}, lines
    ids = {first.headers["X-Request-Id"], generated, refused.headers["X-Request-Id"]}
    assert {line["request_id"] for line in lines} == ids
    assert by_kind["rejected"][0]["reason"] == "invalid_event_id"
    assert {line["outcome"] for line in by_kind["accepted"]} == {"delivered"}
    assert all(line["client"] == "203.0.113.0/24" for line in lines)
    assert all(line["level"] in ("info", "warning") and line["ts"].endswith("Z") for line in lines)

    text = relay.log_path.read_text(errors="replace")
    assert VISITOR_IP not in text, "a full visitor IP reached the log"
    assert MARKER not in text, "payload content reached the log"


@pytest.mark.parametrize(
    "address, masked",
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("10.1.2.3", "10.1.2.0/24"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("not-an-ip", "invalid"),
        ("", None),
        (None, None),
    ],
)
def test_mask_ip(address: str | None, masked: str | None) -> None:
    assert mask_ip(address) == masked


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    config = parse_config(
        {"relay": {"upstream_url": "http://127.0.0.1:1", "store": f"sqlite:///{tmp_path / 'o.sqlite3'}"}}
    )
    return create_app(config, start_delivery=False)


@pytest.mark.parametrize(
    "incoming, kept",
    [
        ("abc12345-trace", True),
        ("x" * 128, True),
        ("short", False),  # under 8 characters: not worth correlating on
        ("x" * 129, False),
        ("has space 1234", False),
        ('{"a":"b"}12345', False),
    ],
)
def test_request_id_header(app: Flask, incoming: str, kept: bool) -> None:
    """Every answer (health checks included) carries an id; only a sane incoming one is echoed."""
    answer = app.test_client().get("/healthz", headers={"X-Request-Id": incoming})
    assert (answer.headers["X-Request-Id"] == incoming) is kept
    assert len(answer.headers["X-Request-Id"]) >= 8


def test_a_decision_line_is_the_line_the_formatter_makes_of_the_same_record() -> None:
    import logging

    from server.jsonlog import JsonFormatter

    fields = {"event": "accepted", "cid": "cmp_1", "status": 202, "client": "203.0.113.0/24"}
    record = logging.LogRecord(
        "pingtree_relay.decisions", logging.WARNING, __file__, 0, "accepted", None, None
    )
    record.fields = fields
    formatter = JsonFormatter()
    assert formatter.format_line(record.created, logging.WARNING, "accepted", fields) == formatter.format(
        record
    )


def test_a_background_deliverys_line_has_no_request_id_but_its_event_uuid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server import logs

    written: list[dict[str, Any]] = []
    monkeypatch.setattr(logs, "_write_decision", lambda level, message, fields: written.append(fields))
    logs.log_decision("delivery", {"cid": "cmp_1", "event_uuid": "u-1", "state": "delivered", "status": 200})
    assert written == [
        {"event": "delivery", "cid": "cmp_1", "state": "delivered", "status": 200, "event_uuid": "u-1"}
    ]


def test_the_writer_writes_every_queued_line_in_order_in_batches(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging
    import queue

    from server.logs import _LineWriter

    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for n in range(500):
        records.put((1764619200.0 + n / 1000, logging.INFO, "delivery", {"event": "delivery", "n": n}))
    record = logging.LogRecord(
        "pingtree_relay.decisions", logging.ERROR, __file__, 0, "by the book", None, None
    )
    records.put(record)  # a record that came the ordinary way (the decision logger's own handler)
    writes = _capture_stderr(monkeypatch)
    writer = _LineWriter(records)
    writer.start()
    writer.stop()  # everything queued before it is written, then the thread ends
    assert not writer.is_alive()
    lines = [json.loads(line) for text in writes for line in text.splitlines()]
    assert [line.get("n") for line in lines[:500]] == list(range(500))
    assert lines[0]["ts"] == "2025-12-01T20:00:00.000Z" and lines[1]["ts"] == "2025-12-01T20:00:00.001Z"
    assert lines[500]["message"] == "by the book" and lines[500]["level"] == "error"
    assert len(writes) < 10  # 501 lines, a handful of writes: batched, not one write per line


# A process whose decision writer is in the middle of a long write to stderr (a pipe drained
# slowly) forks; the child writes to stderr. Exit status 0: the child's write went through.
FORK_DURING_A_WRITE = r"""
import logging, os, sys, threading, time
from server import logs

read_end, write_end = os.pipe()
sys.stderr = os.fdopen(write_end, "w")  # text over a BufferedWriter, like the real stderr
drained = [0]

def drain(pause):
    while chunk := os.read(read_end, 65536):
        drained[0] += len(chunk)
        time.sleep(pause)

threading.Thread(target=drain, args=(0.001,), daemon=True).start()
for n in range(2500):  # about 1 MB, taken by the writer in a batch or two: 16 reads at this pace
    logs._write_decision(logging.INFO, "filler", {"n": n, "pad": "x" * 400})
deadline = time.monotonic() + 10
while drained[0] < 131072 and time.monotonic() < deadline:
    time.sleep(0.001)
pid = os.fork()  # the writer is inside sys.stderr.write now: a write of that size, not finished
if pid == 0:
    threading.Thread(target=drain, args=(0,), daemon=True).start()
    wrote = threading.Event()

    def write():
        sys.stderr.write("child\n")
        sys.stderr.flush()
        wrote.set()

    threading.Thread(target=write, daemon=True).start()
    os._exit(0 if wrote.wait(5) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_fork_during_a_decision_write_leaves_the_child_a_working_stderr() -> None:
    """CPython does not re-make stderr's buffer lock in a forked child: forked mid-write, the child's
    first write to stderr would hang (exit status 3 here) without the writer's fork guard."""
    # -c, from the checkout: the server package imported is this tree's, not an installed copy.
    done = subprocess.run(
        [sys.executable, "-c", FORK_DURING_A_WRITE], cwd=REPO, timeout=60, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]


def test_a_lines_timestamp_is_its_utc_millisecond_across_the_cached_second() -> None:
    # Lines of one second share its formatting (server/jsonlog.py): within it, across its end, and
    # back to an earlier second (a line queued before one written already), each is still its own.
    moments = [1796306853.0, 1796306853.0004, 1796306853.5, 1796306853.9995, 1796306854.001, 1796306853.25]
    rng = random.Random(7)
    moments += [rng.uniform(0, 4e9) for _ in range(2000)]
    for moment in moments:
        expected = dt.datetime.fromtimestamp(int(moment * 1000) / 1000, dt.UTC).isoformat(
            timespec="milliseconds"
        )
        assert utc_timestamp(moment) == expected.replace("+00:00", "Z"), moment


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process's line budget replaced by one with a clock the test moves (``budget.now[0]``),
    and the lines it lets through collected in ``budget.written`` as (level, message, fields)."""
    from server import logs

    fresh = logs._LineBudget(3)
    fresh.now = [100.2]
    fresh.clock = lambda: fresh.now[0]
    fresh._forked()
    fresh.written = []
    monkeypatch.setattr(logs, "_budget", fresh)
    monkeypatch.setattr(
        logs, "_write_decision", lambda level, message, fields: fresh.written.append((level, message, fields))
    )
    return fresh


def test_the_line_budget_writes_its_limit_of_each_level_a_second_and_counts_the_rest(budget: Any) -> None:
    import logging

    from server import logs

    for n in range(10):
        logs.log_decision("accepted", {"cid": "cmp_1", "event_uuid": f"u-{n}", "outcome": "queued"})
    for n in range(2):  # warnings have a budget of their own: a flood of info lines cannot hide them
        logs.log_decision("delivery", {"cid": "cmp_1", "event_uuid": f"d-{n}", "state": "dead"})
    assert [(level, fields.get("event_uuid")) for level, _, fields in budget.written] == [
        (logging.INFO, "u-0"), (logging.INFO, "u-1"), (logging.INFO, "u-2"),
        (logging.WARNING, "d-0"), (logging.WARNING, "d-1"),
    ]  # fmt: skip
    budget.written.clear()
    budget.now[0] = 101.05  # the next second: the summary first, then its own line
    logs.log_decision("accepted", {"cid": "cmp_1", "event_uuid": "u-next", "outcome": "queued"})
    (summary_level, message, summary), (_, _, line) = budget.written
    assert (summary_level, message) == (logging.INFO, "decision lines left out")
    assert summary["event"] == "lines_left_out" and summary["left_out"] == {"accepted": 7}
    assert summary["limit"] == 3 and line["event_uuid"] == "u-next"
    assert summary["seconds"] == pytest.approx(0.85)  # from the first line left out (100.2) to now
    assert budget.flush(final=True) is None  # nothing left out since


def test_no_limit_writes_every_line(budget: Any) -> None:
    from server import logs

    budget.limit = 0
    for n in range(200):
        logs.log_decision("accepted", {"cid": "cmp_1", "event_uuid": f"u-{n}", "outcome": "queued"})
    assert len(budget.written) == 200


def test_the_writer_says_what_was_left_out_when_no_decision_comes(
    budget: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import queue

    from server import logs

    for _ in range(5):
        logs.log_decision("rejected", {"cid": "cmp_1", "reason": "origin", "status": 403})
    writes = _capture_stderr(monkeypatch)
    monkeypatch.setattr(logs._LineWriter, "IDLE_SECONDS", 0.01)
    writer = logs._LineWriter(queue.SimpleQueue())
    writer.start()
    budget.now[0] = 102.0  # a second later, and nothing else comes
    try:
        text = wait_for(lambda: "".join(writes), timeout=10, message="the summary line")
    finally:
        writer.stop()
    (line,) = [json.loads(raw) for raw in text.splitlines()]
    assert line["event"] == "lines_left_out" and line["left_out"] == {"rejected": 2}
    assert line["message"] == "decision lines left out" and line["level"] == "info"


def test_the_config_sets_the_processs_line_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server import logs

    monkeypatch.setattr(logs._budget, "limit", logs._budget.limit)  # as it was, after the test
    config = parse_config(
        {
            "relay": {
                "upstream_url": "http://127.0.0.1:9",
                "store": f"sqlite:///{tmp_path / 'o.sqlite3'}",
                "decision_log_limit": 7,
            },
            "campaigns": {"c": {"events": {"e": {}}}},
        }
    )
    app = create_app(config, start_delivery=False)
    try:
        assert logs._budget.limit == 7
    finally:
        app.extensions["relay"].close()
