"""Every line the relay process writes is one JSON object with ``ts``, ``level`` and ``message``.

That includes gunicorn's own lines (its logger class is :class:`GunicornLogger`), Python warnings,
and tracebacks: an exception is the ``error`` field of its line, never loose lines on stderr (an
uncaught one in any thread too, through the exception hooks). A log shipper can then parse the
stream line by line without a multi-line rule.

Addresses: a visitor's full IP address is never written. Structured fields carry it masked
(:func:`mask_ip`: the /24 of IPv4, the /48 of IPv6); free text (gunicorn's messages, exception
texts) has every address in it masked the same way. Loopback and unspecified addresses are left
as they are: they are this box's own (``Listening at: http://127.0.0.1:8000``), never a visitor's.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import ipaddress
import json
import logging
import re
import sys
import threading
import time
from types import TracebackType
from typing import Any

from gunicorn.glogging import Logger as _GunicornBaseLogger

# Libraries that log a line per HTTP request at INFO (one per delivery attempt): warnings only.
_QUIET = ("httpx", "httpcore", "urllib3", "werkzeug")
# IPv4 and (loosely) IPv6 in free text; a candidate that does not parse as an address is kept.
_ADDRESS = re.compile(
    r"(?<![\w.:/])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})"
    r"(?![\w.]*/\d)(?=[^\w.]|\.?$|\.\D)"
)


@functools.lru_cache(maxsize=4096)  # on every decision line; a page's events come from one address
def mask_ip(address: str | None) -> str | None:
    """The network, not the host: ``203.0.113.77`` -> ``203.0.113.0/24``, IPv6 -> its /48."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return "invalid"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def mask_addresses(text: str) -> str:
    """``text`` with every visitor-possible IP address replaced by its masked network."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        try:
            ip = ipaddress.ip_address(found)
        except ValueError:
            return found  # a time like 12:00:00, a version number
        if ip.is_loopback or ip.is_unspecified:
            return found
        return mask_ip(found) or found

    return _ADDRESS.sub(replace, text) if ("." in text or ":" in text) else text


def utc_timestamp(created: float) -> str:
    """``2026-12-01T20:00:00.123Z``; the lines of one second share the formatting of its date and
    time (a busy worker writes a line or two per millisecond: one formatting per millisecond was
    still one ``datetime`` per line), and add their milliseconds to it."""
    global _last_second
    millisecond = int(created * 1000)
    second, fraction = divmod(millisecond, 1000)
    last = _last_second
    if last[0] != second:
        text = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = last = (second, text)
    return f"{last[1]}.{fraction:03d}Z"


_last_second: tuple[int, str] = (-1, "")
# One encoder for every line (json.dumps given any argument builds a new encoder per call).
_LINE_JSON = json.JSONEncoder(default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """A record -> one JSON object per line; ``record.fields`` (a dict) is merged in.

    ``fields`` are structured values the emitter already made safe (masked addresses); the free text
    (message, traceback) is masked here.
    """

    def format(self, record: logging.LogRecord) -> str:
        error = None
        if record.exc_info:
            error = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted before it crossed a queue
            error = record.exc_text
        logger = None
        if record.name != "root" and not record.name.startswith("pingtree_relay.decisions"):
            logger = record.name
        fields = getattr(record, "fields", {})
        return self.format_line(record.created, record.levelno, record.getMessage(), fields, logger, error)

    def format_line(
        self,
        created: float,
        level: int,
        message: str,
        fields: dict[str, Any],
        logger: str | None = None,
        error: str | None = None,
    ) -> str:
        """The line itself; a decision (server/logs.py) comes here without a record."""
        line: dict[str, Any] = {
            "ts": utc_timestamp(created),
            "level": logging.getLevelName(level).lower(),
            "message": mask_addresses(message),
        }
        if logger is not None:
            line["logger"] = logger
        line.update(fields)
        if error is not None:
            line["error"] = mask_addresses(error)
        return _LINE_JSON.encode(line)


def configure() -> None:
    """Route this process's logging, warnings and uncaught exceptions to JSON lines on stderr.

    Called by ``serve`` in the master before gunicorn starts; the workers inherit it through fork.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    # Last, so the handler above keeps the real stream: what others print (gunicorn prints a worker's
    # boot error with print()) goes through these and comes out as JSON lines too.
    if not isinstance(sys.stdout, JsonLineWriter):
        sys.stdout = JsonLineWriter(sys.stdout, "info")
    if not isinstance(sys.stderr, JsonLineWriter):
        sys.stderr = JsonLineWriter(sys.stderr, "error")


class JsonLineWriter(io.TextIOBase):
    """A text stream that passes our JSON lines through and wraps any other line into one.

    Our lines are recognised by their first characters (every :class:`JsonFormatter` line starts
    with ``{"ts":``), not parsed: the decision lines of every event cross this.
    """

    def __init__(self, stream: Any, level: str) -> None:
        super().__init__()
        self._stream = stream
        self._level = level
        self._buffer = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            if "\n" not in self._buffer:
                return len(text)
            *lines, self._buffer = self._buffer.split("\n")
            out = [line if line.startswith('{"ts":') else self._wrap(line) for line in lines if line.strip()]
            if out:
                self._stream.write("\n".join(out) + "\n")
                self._stream.flush()
        return len(text)

    def _wrap(self, line: str) -> str:
        return json.dumps(
            {
                "ts": utc_timestamp(time.time()),
                "level": self._level,
                "message": mask_addresses(line.rstrip()),
                "logger": "print",
            },
            separators=(",", ":"),
        )

    def flush(self) -> None:
        with self._lock:
            if self._buffer.strip():  # a last line without its newline
                self._stream.write(self._wrap(self._buffer) + "\n")
            self._buffer = ""
        self._stream.flush()

    def fileno(self) -> int:
        return int(self._stream.fileno())

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._stream, "encoding", "utf-8"))


def _uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("pingtree_relay").critical("uncaught exception", exc_info=(kind, value, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or isinstance(args.exc_value, SystemExit):
        return
    name = args.thread.name if args.thread else "?"
    logging.getLogger("pingtree_relay").critical(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )


class GunicornLogger(_GunicornBaseLogger):  # type: ignore[misc]
    """gunicorn's logger with every handler writing :class:`JsonFormatter` lines (``logger_class``)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())
