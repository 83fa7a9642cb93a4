"""Everything ``serve`` writes is JSON, line by line: its own lines, gunicorn's, the access log,
a worker's traceback; and a visitor's full IP address appears nowhere in it."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config as GunicornConfig

from server.jsonlog import GunicornLogger, JsonFormatter, mask_addresses
from server.outbox.sqlite import MAX_PAGE_COUNT_ENV, SQLiteStore
from tests.conftest import Relay, RelayFactory, wait_for

VISITOR_IP = "203.0.113.77"
VISITOR_V6 = "2001:db8:85a3:8d3:1319:8a2e:370:7348"


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, parsed; a line that is not JSON fails the test, naming it."""
    lines = []
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            line = json.loads(raw)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {raw!r}") from None
        assert isinstance(line, dict) and {"ts", "level", "message"} <= set(line), raw
        assert line["ts"].endswith("Z") and line["level"] in ("debug", "info", "warning", "error", "critical")
        lines.append(line)
    return lines


def workers_of(relay: Relay) -> list[int]:
    assert relay.proc is not None
    pid = relay.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_every_line_serve_writes_is_json(
    relay_factory: RelayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "small.sqlite3"
    SQLiteStore(str(store)).close()
    with closing(sqlite3.connect(store)) as db:  # closed: Python 3.13 warns of a leaked connection
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    monkeypatch.setenv(MAX_PAGE_COUNT_ENV, str(pages + 8))  # a small "disk": it fills, with a traceback
    relay = relay_factory(trusted_proxy_hops=1, access_log=True, workers=2, store=f"sqlite:///{store}")
    proxy = {"X-Forwarded-For": VISITOR_IP}
    accepted = relay.post({"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex}, headers=proxy)
    refused = relay.post({"event_id": "nope", "transaction_id": "t"}, headers={"X-Forwarded-For": VISITOR_V6})
    assert (accepted.status_code, refused.status_code) == (200, 400)
    with socket.create_connection(
        ("127.0.0.1", relay.port), timeout=5
    ) as raw:  # gunicorn answers this itself
        raw.sendall(b"NOT A REQUEST LINE\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")

    wait_for(
        lambda: any(x.get("event") == "request" and x["status"] == 400 for x in json_lines(relay.log_path)),
        message="the access line of the refused event",
    )
    # An edited-but-invalid config and a SIGHUP: the master's refusal is a JSON line too.
    relay.config_path.write_text(relay.config_path.read_text() + "\n[relay.oops\n")
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGHUP)
    wait_for(
        lambda: any("reload refused" in x["message"] for x in json_lines(relay.log_path)),
        message="the refused reload",
    )
    # A traceback: the store's "disk" fills up (each refusal logs why, with its traceback).
    for n in range(400):
        if (
            relay.post({"event_id": "quote_viewed", "transaction_id": f"fill-{n}"}, headers=proxy).status_code
            == 503
        ):
            break
    wait_for(
        lambda: any(
            "Traceback (most recent call last)" in x.get("error", "") for x in json_lines(relay.log_path)
        ),
        message="a traceback line",
    )

    lines = json_lines(relay.log_path)
    text = relay.log_path.read_text()
    assert VISITOR_IP not in text and VISITOR_V6 not in text and "2001:db8:85a3:8d3" not in text
    messages = [line["message"] for line in lines]
    assert any(m.startswith("pingtree-relay ") and " serving on http://127.0.0.1:" in m for m in messages)
    assert any(m.startswith("Invalid request from ip=127.0.0.1") for m in messages), messages  # gunicorn's
    access = [line for line in lines if line.get("event") == "request"]
    assert {(a["method"], a["path"], a["status"]) for a in access} >= {
        ("POST", "/api/event/cmp_test", 200),
        ("POST", "/api/event/cmp_test", 400),
    }
    events = [a for a in access if a["path"] == "/api/event/cmp_test"]
    assert {a["client"] for a in events} == {"203.0.113.0/24", "2001:db8:85a3::/48"}
    assert all(a["request_id"] and a["duration_ms"] >= 0 for a in access)
    tracebacks = [line for line in lines if "Traceback (most recent call last)" in line.get("error", "")]
    assert tracebacks and "full" in tracebacks[0]["error"], messages
    assert any(line.get("event") == "accepted" for line in lines)  # the decision lines, in the same form


def test_no_access_log_unless_asked(relay_factory: RelayFactory) -> None:
    relay = relay_factory()
    assert relay.post({"event_id": "quote_viewed", "transaction_id": uuid.uuid4().hex}).status_code == 200
    wait_for(
        lambda: any(x.get("event") == "accepted" for x in json_lines(relay.log_path)), message="a decision"
    )
    assert not [line for line in json_lines(relay.log_path) if line.get("event") == "request"]


def record(message: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError(f"bad peer {VISITOR_IP}")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("gunicorn.error", logging.WARNING, __file__, 1, message, None, info)


def test_free_text_addresses_are_masked() -> None:
    line = json.loads(JsonFormatter().format(record(f"Invalid request from ip={VISITOR_IP}: x", exc=True)))
    assert line["message"] == "Invalid request from ip=203.0.113.0/24: x"
    assert "bad peer 203.0.113.0/24" in line["error"] and VISITOR_IP not in line["error"]
    assert (line["level"], line["logger"]) == ("warning", "gunicorn.error")
    assert (
        mask_addresses("Listening at: http://127.0.0.1:8000 (42), at 12:00:00, 0.1.0")
        == "Listening at: http://127.0.0.1:8000 (42), at 12:00:00, 0.1.0"
    )
    assert mask_addresses(f"[{VISITOR_V6}]:443") == "[2001:db8:85a3::/48]:443"


def test_gunicorns_handlers_write_json() -> None:
    cfg = GunicornConfig()
    cfg.set("accesslog", "-")
    logger = GunicornLogger(cfg)
    handlers = logger.error_log.handlers + logger.access_log.handlers
    assert handlers and all(isinstance(h.formatter, JsonFormatter) for h in handlers)
