"""Where a server listens: bind before serving, and tell whoever started it which port it got.

``--port 0`` lets the kernel pick a free port; ``--port-file PATH`` writes the port that was bound
to ``PATH`` once the socket listens. Together they replace "pick a free port, close it, start the
server on it", which races with every other process picking ports meanwhile (tests under
``pytest -n 2``, benchmarks): the socket that was bound is the one that serves.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

BACKLOG = 2048  # gunicorn's default backlog: a pre-bound socket queues as many as gunicorn's own


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: the kernel picks) and already listening.

    For gunicorn (``bind="fd://N"``): bound here, in the master, so the port is known before any
    worker exists, and ``demo`` can build its config (which names its own port) from it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn sets it
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def write_port_file(path: str | Path, port: int) -> None:
    """Write ``port`` (decimal, newline) to ``path`` atomically: a reader never sees half a number."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partial.write_text(f"{port}\n", encoding="ascii")
    os.replace(partial, target)


def read_port_file(path: str | Path) -> int | None:
    """The port a server wrote with :func:`write_port_file`, or ``None`` while there is none yet."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None
