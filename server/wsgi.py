"""Run a WSGI app under gunicorn from inside our own CLI (no gunicorn command line to get right).

Worker model, chosen for the accept path (see docs/benchmarks.md): :class:`server.worker.LoopWorker`,
one asyncio loop per process that parses HTTP in C (httptools) and runs the app on the loop's own
thread, or on one of ``threads`` request threads when the app says the request may wait on the
network. The accept path is a short SQLite/Redis write plus, at most, one bounded inline attempt
upstream: the 202s run on the loop, the inline attempts on threads, so a worker keeps accepting
while a few of them wait on a slow Pingtree, and slow clients cost a socket, never a thread. Background delivery is
not the workers' job: ``serve`` runs the box's delivery engine as supervised sidecar processes
(``pingtree-relay deliver``, one per core up to 4, sharing the box's cap: see :class:`_SidecarArbiter`). SIGTERM makes gunicorn stop accepting,
finish requests in flight (``graceful_timeout``), and the delivery process finish its sends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from .worker import LoopWorker

_METRICS_PREFIX = "pingtree-relay-metrics-"


class _App(BaseApplication):  # type: ignore[misc]
    def __init__(
        self,
        factory: Callable[[], Any],
        options: dict[str, Any],
        sidecar: list[str] | None = None,
        on_reload: Callable[[], None] | None = None,
        sidecar_env: Callable[[], dict[str, str]] | None = None,
        sidecars: int = 1,
    ) -> None:
        self._factory = factory
        self._options = options
        self._sidecar = sidecar
        self._sidecars = sidecars
        self._sidecar_env = sidecar_env
        self._on_reload = on_reload
        super().__init__()

    def run(self) -> None:
        if self._sidecar is None:
            super().run()
            return
        try:
            _SidecarArbiter(self, self._sidecar, self._sidecar_env, self._sidecars).run()
        except RuntimeError as exc:
            sys.exit(f"Error: {exc}")

    def reload(self) -> None:
        # Runs in the master on SIGHUP, before gunicorn starts the new workers.
        if self._on_reload is not None:
            self._on_reload()
        super().reload()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()


class _SidecarArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's master, also supervising ``count`` more processes: ``pingtree-relay deliver``.

    Started after the workers (never forked from them: each is a fresh ``exec``), each restarted if
    it dies (at most once a second), and on shutdown sent SIGTERM first and given the graceful
    timeout to finish its sends and give its leases back. gunicorn's own reaping (``waitpid(-1)``)
    may collect an exit status; ``Popen.poll`` then reports 0, which is still "not running".
    """

    def __init__(
        self, app: _App, command: list[str], env: Callable[[], dict[str, str]] | None = None, count: int = 1
    ) -> None:
        self._command = command
        self._env = env
        self._sidecars = [_Sidecar() for _ in range(count)]
        super().__init__(app)

    def manage_workers(self) -> None:
        super().manage_workers()
        for sidecar in self._sidecars:
            self._supervise(sidecar)

    def _supervise(self, sidecar: _Sidecar) -> None:
        if sidecar.running() or time.monotonic() < sidecar.next_start:
            return
        if sidecar.proc is not None and sidecar.reloading:
            self.log.info(
                "delivery process (pid:%s) stopped for the reload; starting it again", sidecar.proc.pid
            )
        elif sidecar.proc is not None:
            self.log.error("delivery process (pid:%s) exited; restarting it", sidecar.proc.pid)
        sidecar.reloading = False
        sidecar.next_start = time.monotonic() + 1.0
        env = {**os.environ, **self._env()} if self._env is not None else None
        sidecar.proc = subprocess.Popen(self._command, env=env)

    def _running(self) -> list[subprocess.Popen[bytes]]:
        return [sidecar.proc for sidecar in self._sidecars if sidecar.proc is not None and sidecar.running()]

    def reload(self) -> None:
        # SIGHUP: new workers get the (validated) config; so do the delivery processes, each restarted
        # by the supervisor once it has finished its sends and handed back its leases.
        super().reload()
        for sidecar in self._sidecars:
            if sidecar.proc is not None and sidecar.running():
                sidecar.proc.send_signal(signal.SIGTERM)
                sidecar.next_start, sidecar.reloading = 0.0, True

    def stop(self, graceful: bool = True) -> None:
        deadline = time.monotonic() + self.cfg.graceful_timeout
        for sidecar in self._sidecars:
            sidecar.next_start = float("inf")  # no restart while stopping
        for proc in self._running():
            proc.send_signal(signal.SIGTERM)
        super().stop(graceful)
        while self._running() and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in self._running():
            self.log.error("delivery process (pid:%s) did not stop in time; killing it", proc.pid)
            proc.kill()


@dataclass
class _Sidecar:
    """One supervised delivery process: its Popen (None before the first start) and restart state."""

    proc: subprocess.Popen[bytes] | None = None
    next_start: float = 0.0  # not restarted before this (time.monotonic)
    reloading: bool = False  # stopped on purpose, for a SIGHUP

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def default_workers() -> int:
    """One process per core (2 to 8), each with few threads (``run``'s ``threads=8``).

    Enough processes that the GIL is not the limit (a thread of this app runs Python for ~1 ms per
    event and holds the GIL meanwhile, so 16 busy threads in one process mostly wait for each
    other), and no more: ``pingtree-relay deliver`` runs beside them, and every process past the
    cores only adds switching. Measured on 2 cores, 1,000 events/s offered with a 300 ms upstream
    for 15 s (docs/benchmarks.md): 4 workers accepted and delivered 705 events/s at 2.5 ms of CPU
    each, 2 workers 832 at 2.0 ms, 3 workers 830. Each worker costs ~55 MB.
    """
    return max(2, min(8, os.cpu_count() or 1))


def default_delivery_processes() -> int:
    """One per core, 1 to 4: the delivery engine of one process is one GIL, about one core's worth
    of requests. Measured on 2 cores, draining 30,000 events to the fast sandbox (SQLite): 1 process
    1,520 events/s, 2 processes 1,863-1,923, 3 processes 1,975 (the cores were then the limit);
    with the box loaded by 1,000 events/s of new traffic, 1 or 2 processes delivered the same. Each
    costs ~60 MB and, idle, one look at the store every 50 ms.
    """
    return max(1, min(4, os.cpu_count() or 1))


def run(
    factory: Callable[[], Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    listener: socket.socket | None = None,
    workers: int | None = None,
    threads: int = 8,
    graceful_timeout: int = 15,
    multiprocess_metrics: bool = False,
    sidecar: list[str] | None = None,
    sidecars: int = 1,
    sidecar_env: Callable[[], dict[str, str]] | None = None,
    on_reload: Callable[[], None] | None = None,
    **extra: Any,
) -> None:
    """Serve ``factory()`` until SIGTERM/SIGINT. The app is built in each worker after the fork.

    ``multiprocess_metrics`` gives the workers one fresh prometheus-client directory for this run
    (see :func:`metrics_dir`), so ``/metrics`` adds up every worker whichever one answers.
    ``sidecar`` is a command the master runs ``sidecars`` times beside the workers and supervises
    (``serve``'s delivery processes). ``on_reload`` runs in the master on SIGHUP, before the new workers are forked.
    ``listener``, a socket already bound and listening (:func:`server.listening.bind_listener`),
    is served instead of binding ``host:port``: gunicorn takes it over as ``fd://``.
    """
    options = {
        "bind": f"fd://{listener.detach()}" if listener is not None else f"{host}:{port}",
        "workers": workers or default_workers(),
        "worker_class": LoopWorker,
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
    if not multiprocess_metrics:
        _App(factory, options, sidecar, on_reload, sidecar_env, sidecars).run()
        return
    with metrics_dir():
        options.setdefault("child_exit", _child_exit)
        _App(factory, options, sidecar, on_reload, sidecar_env, sidecars).run()


@contextmanager
def metrics_dir() -> Iterator[str]:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for one serve run, removed when the master exits.

    Set here, in the master, before any worker exists: prometheus-client decides at import time
    whether values go to files, and the workers import it only after the fork. Fresh per run because
    files left by an earlier run would be added to this run's counters.

    Only the master cleans up: gunicorn forks its workers from inside this ``with`` block, so a
    worker leaving by ``SystemExit`` unwinds through the same ``finally`` and must not delete the
    directory its siblings still write to.
    """
    _remove_orphans()
    master = os.getpid()
    path = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield path
    finally:
        if os.getpid() == master:  # not a worker unwinding after the fork
            if previous is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
            shutil.rmtree(path, ignore_errors=True)


def _remove_orphans() -> None:
    """Delete metrics directories of masters that died without cleaning up (SIGKILL, power loss)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        pid = path.name[len(_METRICS_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _child_exit(server: Any, worker: Any) -> None:
    """Gunicorn hook: a dead worker's live gauges must stop counting (its counters stay summed)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
