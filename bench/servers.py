"""Start and stop the processes a benchmark talks to: relay, sandbox, baseline, redis-server.

Each runs in its own process group on a loopback port it binds itself (``--port 0``) and reports
(``--port-file``), is polled until it answers, and is stopped with SIGTERM (then SIGKILL) so that
nothing outlives the suite; on Linux it also gets SIGTERM when whoever started it dies
(:func:`die_with_parent`), so that not even a killed suite leaves servers behind. The tests start
their servers with the same :class:`Server`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.listening import bind_listener, bound_port, read_port_file, write_port_file

ROOT = Path(__file__).resolve().parent.parent
CID = "cmp_bench"
ORIGIN = "https://www.example.com"

CAMPAIGN_TOML = f"""
[campaigns.{CID}]
allowed_origins = ["{ORIGIN}"]
conversion_timezone = "EST"

[campaigns.{CID}.server_fields]
cost = 1.25
cost_operation = "add"

[campaigns.{CID}.events.quote_viewed]
[campaigns.{CID}.events.sale_completed]
conversion = true
max_revenue = 5000
"""


BOOST_NICE = -10


def boost_priority() -> None:
    """Raise this process's CPU priority (nice -10), for the load generator and the fake upstreams.

    They stand for things that are not on the relay's box (browsers, Pingtree) and use a few % of a
    core; on a machine shared with other work they must still never be what limits a figure. The
    relay and its baselines keep the normal priority, so their ratios compare like with like.
    Called in a child that starts its own session: with the kernel's autogroup scheduling (Debian's
    default) each session is one group and a group's share is set by its autogroup nice, not by
    the process's. Not permitted (not root): the priority stays as it was.
    """
    for set_nice in (
        lambda: os.nice(BOOST_NICE),
        lambda: Path("/proc/self/autogroup").write_text(str(BOOST_NICE)),
    ):
        try:
            set_nice()
        except OSError:
            pass


def _linux_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]


# Looked up here, in the parent: a forked child of a threaded parent should only call a function.
_PRCTL = _linux_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a child, before exec: ask Linux to SIGTERM it when its parent dies (``PR_SET_PDEATHSIG``).

    A test run or benchmark killed outright (a ``timeout``, a CI cancel, Ctrl-C twice) never runs
    its ``stop()``s, and each server it started runs on in its own session, idle but holding a port
    and a little CPU, into the next benchmark's figures. SIGTERM, not SIGKILL: a relay's master then
    stops its workers and delivery processes as it does on any SIGTERM. The kernel ties this to
    the thread that spawned the child: servers are started from a test's or the bench's own thread.
    Elsewhere than Linux: nothing (the server outlives a killed parent, as before).
    """
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl: nobody will stop this one
        os._exit(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (and may by the time it is used).

    Only for what cannot bind port 0 itself and report it (redis-server: :class:`Server` retries it
    on a taken port) or for an address that must refuse connections.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, message: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; at the deadline raise
    ``AssertionError`` naming ``message`` and the last value. The one polling loop of the tests and
    the benchmarks: they never sleep to synchronise with a process."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
        time.sleep(interval)


class PortTaken(RuntimeError):
    """The server exited because its port was taken between picking it and binding it."""


@dataclass
class Server:
    """One server process in its own process group; ``url`` is where it listens once :meth:`start` returns.

    ``args`` may name ``{port}`` and ``{port_file}``. With ``{port_file}`` (our CLI's ``--port-file``)
    the server binds ``--port 0`` itself and writes the port it got: nothing races for it. Without
    (redis-server cannot report a port), ``{port}`` is a :func:`free_port` and a start that fails
    because the port was taken meanwhile is retried on another one. A restart (``start`` again
    after ``stop``) binds the port it had, so ``url`` stays the same.
    """

    args: list[str]
    log_path: Path
    port: int = 0  # 0 until start() learns it; set it to bind a given port
    health_path: str = "/healthz"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    boost: bool = False  # run at a higher CPU priority (see boost_priority)
    cwd: Path = ROOT  # the source tree it runs from (another one simulates an upgrade)
    bind_attempts: int = 5  # for a server that cannot report its port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def port_file(self) -> Path:
        return self.log_path.with_name(self.log_path.stem + ".port")

    @property
    def reports_port(self) -> bool:
        return any("{port_file}" in arg for arg in self.args)

    def start(self, timeout: float = 30.0) -> Server:
        """Spawn the process and poll ``health_path`` until it answers 200."""
        fixed = self.port
        attempts = 1 if self.reports_port or fixed else self.bind_attempts
        for attempt in range(attempts):
            try:
                return self._start_once(fixed or (0 if self.reports_port else free_port()), timeout)
            except PortTaken:
                self.port = fixed
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, port: int, timeout: float) -> Server:
        self.port_file.unlink(missing_ok=True)
        argv = [
            arg.replace("{port}", str(port)).replace("{port_file}", str(self.port_file)) for arg in self.args
        ]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        # The child gets its own copy of the descriptor; ours is closed as soon as it is spawned.
        parent, boost = os.getpid(), self.boost

        def before_exec() -> None:
            die_with_parent(parent)
            if boost:
                boost_priority()

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True,
                preexec_fn=before_exec,
            )
        self.port = port
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                output = self.log_path.read_bytes()[log_start:].decode(errors="replace")
                if "Address already in use" in output and not self.reports_port:
                    raise PortTaken(output[-3000:])
                raise RuntimeError(f"{argv[:4]} exited with {proc.returncode}:\n{output[-3000:]}")
            if not self.port:
                self.port = read_port_file(self.port_file) or 0
            return bool(self.port) and self._healthy()

        try:
            wait_for(up, timeout=timeout, message=f"{argv[:4]} to answer on {self.health_path or 'its port'}")
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + self.health_path, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """PIDs of the direct children of this process (gunicorn's workers)."""
        if self.proc is None:
            return []
        return children(self.proc.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group (graceful), SIGKILL it if it lingers; the exit status."""
        return self.signal(signal.SIGTERM, timeout, group=True)

    def kill(self) -> int | None:
        """SIGKILL the whole process group: master and workers die with no chance to clean up."""
        return self.signal(signal.SIGKILL, 10.0, group=True)

    def signal(self, sig: int, timeout: float, *, group: bool) -> int | None:
        """Send ``sig`` to the process (or its whole group) and wait for it; SIGKILL the group after
        ``timeout``. The exit status, or ``None`` when it was never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        if group:
            os.killpg(self.proc.pid, sig)  # start_new_session: its pid is its group's id
        else:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def __enter__(self) -> Server:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def write_config(path: Path, *, upstream: str, store: str, **relay_keys: Any) -> Path:
    """A relay config with the bench campaign. Per-IP rate limits are off: all load comes from 127.0.0.1."""
    lines = ["[relay]", f'upstream_url = "{upstream}"', f'store = "{store}"']
    lines += [f"{key} = {value!r}" for key, value in relay_keys.items()]
    lines += ["[relay.rate_limits]", 'per_ip = ""', 'per_campaign = ""']
    path.write_text("\n".join(lines) + "\n" + CAMPAIGN_TOML)
    return path


# A server binds port 0 (or, restarted, the port it had) and writes the port it got: see Server.
REPORT_PORT = ["--port", "{port}", "--port-file", "{port_file}"]


def cli(*args: str) -> list[str]:
    """``pingtree-relay ARGS`` on a port it binds itself and reports."""
    return [sys.executable, "-m", "server.cli", *args, *REPORT_PORT]


def listen(host: str, port: int, port_file: str | None) -> socket.socket:
    """For the bench's own gunicorn servers: bind now (``port`` 0: any) and write ``port_file``."""
    listener = bind_listener(host, port)
    if port_file:
        write_port_file(port_file, bound_port(listener))
    return listener


def serve_defaults() -> dict[str, Any]:
    """``workers`` and ``threads`` exactly as ``pingtree-relay serve`` runs by default (read from its
    parser, one source of truth), for the baselines that must run under the same gunicorn settings."""
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "--config", "unused.toml"])
    return {"workers": getattr(args, "workers", None), "threads": getattr(args, "threads", 8)}


def sandbox(workdir: Path) -> Server:
    """The Pingtree sandbox, as ``pingtree-relay sandbox`` runs it (one process, one event loop)."""
    cfg = write_config(workdir / "sandbox.toml", upstream="http://127.0.0.1:1", store="sqlite:///unused")
    return Server(cli("sandbox", "--config", str(cfg)), workdir / "sandbox.log", boost=True)


def relay(workdir: Path, upstream: str, store: str, name: str = "relay", **relay_keys: Any) -> Server:
    """``pingtree-relay serve`` with its defaults (workers by CPU count, 16 threads) and ``relay_keys``."""
    cfg = write_config(workdir / f"{name}.toml", upstream=upstream, store=store, **relay_keys)
    return Server(cli("serve", "--config", str(cfg)), workdir / f"{name}.log")


def baseline(workdir: Path) -> Server:
    """The bare Flask endpoint of :mod:`bench.baseline` under the same gunicorn settings as ``serve``."""
    return Server([sys.executable, "-m", "bench.baseline", *REPORT_PORT], workdir / "baseline.log")


def naive_proxy(workdir: Path, upstream: str) -> Server:
    """The naive proxy of :mod:`bench.naive_proxy` to ``upstream``, same gunicorn settings as ``serve``."""
    return Server(
        [sys.executable, "-m", "bench.naive_proxy", *REPORT_PORT, "--upstream", upstream],
        workdir / "naive-proxy.log",
    )


def fake_upstream(workdir: Path, latency_ms: float = 0.0, name: str = "upstream") -> Server:
    """The lean fake Pingtree of :mod:`bench.fake_upstream`, answering ``latency_ms`` after each request."""
    return Server(
        [sys.executable, "-m", "bench.fake_upstream", *REPORT_PORT, "--latency-ms", f"{latency_ms:g}"],
        workdir / f"{name}.log",
        boost=True,
    )


def upstream_stats(upstream: Server) -> dict[str, Any]:
    return dict(httpx.get(upstream.url + "/_upstream/stats", timeout=10).json())


def cpu_seconds(server: Server) -> float:
    """User + system CPU of the server and all its live descendants (gunicorn master and workers)."""
    if server.proc is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        kids = [c for p in frontier for c in children(p)]
        found += kids
        frontier = kids
    return found


def demo(workdir: Path) -> Server:
    """``pingtree-relay demo`` (relay + sandbox + demo pages on one port); its SQLite store goes in ``workdir``."""
    return Server(cli("demo"), workdir / "demo.log", env={"TMPDIR": str(workdir)})


def redis_args(data: Path, *, aof: bool, binary: str = "redis-server") -> list[str]:
    """redis-server on 127.0.0.1:{port} with its files in ``data`` and no RDB snapshots; ``aof``: an
    append-only file synced every second (as server/outbox/redis.py recommends), else no persistence."""
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
    where = ["--port", "{port}", "--bind", "127.0.0.1", "--dir", str(data), "--daemonize", "no"]
    return [binary, *where, "--save", "", *persistence]


def redis_server(workdir: Path, data: Path | None = None) -> Server:
    """A throwaway redis-server with an AOF (:func:`redis_args`). ``data`` is its directory (default
    ``workdir/redis``); one that holds an AOF starts with its data."""
    data = data or workdir / "redis"
    data.mkdir(exist_ok=True)
    server = Server(redis_args(data, aof=True), workdir / "redis.log", health_path="")
    server._healthy = lambda: redis_ping(server.port)  # type: ignore[method-assign]
    return server


def redis_ping(port: int) -> bool:
    """Whether a redis-server answers PING on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False
