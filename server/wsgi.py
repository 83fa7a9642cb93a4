"""Run a WSGI app under gunicorn from inside our own CLI (no gunicorn command line to get right).

Worker model, chosen for the accept path (see docs/benchmarks.md): ``gthread`` workers. The accept
path is a short SQLite/Redis write plus, at most, one bounded inline attempt upstream; threads let a
worker keep accepting while a few of its threads wait on a slow Pingtree, and nothing here needs an
event loop. SIGTERM makes gunicorn stop accepting, finish requests in flight (``graceful_timeout``)
and run each worker's ``atexit``/shutdown hooks, which drain the delivery threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication


class _App(BaseApplication):  # type: ignore[misc]
    def __init__(self, factory: Callable[[], Any], options: dict[str, Any]) -> None:
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()


def default_workers() -> int:
    return max(2, min(4, os.cpu_count() or 2))


def run(
    factory: Callable[[], Any],
    *,
    host: str,
    port: int,
    workers: int | None = None,
    threads: int = 16,
    graceful_timeout: int = 15,
    **extra: Any,
) -> None:
    """Serve ``factory()`` until SIGTERM/SIGINT. The app is built in each worker after the fork."""
    options = {
        "bind": f"{host}:{port}",
        "workers": workers or default_workers(),
        "worker_class": "gthread",
        "threads": threads,
        "graceful_timeout": graceful_timeout,
        "timeout": 60,
        "keepalive": 5,
        "preload_app": False,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
    }
    options.update(extra)
    _App(factory, options).run()
