"""Shared fixtures: real servers on loopback, in their own processes.

``sandbox`` is a running Pingtree sandbox; ``relay_factory`` starts relays (``pingtree-relay serve``)
whose upstream is that sandbox, from a config written to ``tmp_path``. Nothing is mocked on this
path: the tests talk HTTP to real gunicorn processes that write real SQLite files.
"""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from flask import Flask

from bench import servers as bench_servers
from bench.servers import wait_for
from server.listening import bind_listener, bound_port

__all__ = ["wait_for"]  # the one polling helper, shared with bench/: tests import it from here

ROOT = Path(__file__).resolve().parent.parent

# The plain events say ``inline = true``: most tests read Pingtree's answer in the relay's (a conversion
# gets that by default, a plain event 202: tests/test_inline_capacity.py tests the default).
BASE_CAMPAIGNS = """
[campaigns.cmp_test]
allowed_origins = ["http://127.0.0.1:{pages_port}", "http://localhost:{pages_port}", "https://*.webflow.io", "https://www.example.com"]
conversion_timezone = "EST"
inactive_sources = ["src_paused"]
extra_fields = ["quote_id"]

[campaigns.cmp_test.server_fields]
cost = 1.25
cost_operation = "add"
sub5 = "from-server"

[campaigns.cmp_test.events.quote_viewed]
inline = true
[campaigns.cmp_test.events.form_submitted]
inline = true
[campaigns.cmp_test.events.call_clicked]
inline = true
allow_duplicates = true
[campaigns.cmp_test.events.sale_completed]
conversion = true
max_revenue = 5000

[campaigns.cmp_other]
allowed_origins = ["https://other.example.org"]
conversion_timezone = "PST"
[campaigns.cmp_other.events.signup]
inline = true
"""


def free_port() -> int:
    """A port nobody listens on right now, for what must name its port before it exists: the
    browser tests' page origin (in the campaigns' allowed origins) and a relay whose config names its
    own URL. Every server the tests start binds port 0 itself (see :class:`ServerProcess`)."""
    return bench_servers.free_port()


class ServerProcess(bench_servers.Server):
    """``python -m server.cli ARGS`` on a port it binds itself (``--port 0 --port-file``); restartable
    on the same port. ``stop`` signals the master only (gunicorn's graceful drain), ``kill`` the group."""

    def __init__(self, args: list[str], log_path: Path, port: int = 0) -> None:
        super().__init__(
            [sys.executable, "-m", "server.cli", *args, *bench_servers.REPORT_PORT], log_path, port=port
        )

    def start(self, timeout: float = 30.0) -> Self:
        super().start(timeout)
        return self

    def log(self) -> str:
        return self.log_tail()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the master (graceful) and wait."""
        return self.signal(signal.SIGTERM, timeout, group=False)


class Sandbox(ServerProcess):
    """The Pingtree sandbox, with its control API as methods."""

    def events(self, **filters: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/_sandbox/events", params=filters, timeout=5)
        r.raise_for_status()
        return list(r.json()["events"])

    def requests(self) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/_sandbox/requests", timeout=5)
        r.raise_for_status()
        return list(r.json()["requests"])

    def fault(self, **spec: Any) -> None:
        httpx.post(self.url + "/_sandbox/faults", json=spec, timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(self.url + "/_sandbox/faults", timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/_sandbox/reset", timeout=5).raise_for_status()

    def set_lock(self, seconds: float) -> None:
        httpx.post(
            self.url + "/_sandbox/config", json={"lock_seconds": seconds}, timeout=5
        ).raise_for_status()


def campaigns_toml(pages_port: int) -> str:
    return BASE_CAMPAIGNS.replace("{pages_port}", str(pages_port))


@pytest.fixture(scope="session")
def pages_listener() -> Iterator[socket.socket]:
    """The socket of the page origin browser tests use, bound (port 0) and listening from the start
    of the session: its port is in cmp_test's allowed_origins long before the pages are served on it
    (tests/browser/conftest.py), and nothing else can take it meanwhile."""
    listener = bind_listener("127.0.0.1", 0)
    yield listener
    listener.close()


@pytest.fixture(scope="session")
def pages_port(pages_listener: socket.socket) -> int:
    """The port of the page origin browser tests use (allowed in cmp_test's allowed_origins)."""
    return bound_port(pages_listener)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory, pages_port: int) -> Iterator[Sandbox]:
    """One sandbox for the session, reset before each test by ``fresh_sandbox``."""
    tmp = tmp_path_factory.mktemp("sandbox")
    cfg = tmp / "sandbox.toml"
    cfg.write_text('[relay]\nupstream_url = "http://127.0.0.1:1"\n' + campaigns_toml(pages_port))
    server = Sandbox(["sandbox", "--config", str(cfg)], tmp / "sandbox.log").start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_sandbox(request: pytest.FixtureRequest) -> None:
    """Every test that uses the sandbox starts with it empty and healthy."""
    if "sandbox" in request.fixturenames:
        sb: Sandbox = request.getfixturevalue("sandbox")
        sb.reset()
        sb.set_lock(2.0)  # reset keeps the lock window: it is configuration, not state


class PostsEvents:
    """``post``: an event to the relay's endpoint, through the class's own ``request``."""

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        raise NotImplementedError

    def post(
        self,
        body: Any,
        *,
        cid: str = "cmp_test",
        origin: str | None = "https://www.example.com",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """POST ``body`` (JSON for a dict or list, else raw bytes) to ``/api/event/{cid}``."""
        sent = {"Origin": origin} if origin else {}
        sent.update(headers or {})
        kwargs["json" if isinstance(body, (dict, list)) else "content"] = body
        return self.request("POST", f"/api/event/{cid}", headers=sent, timeout=15, **kwargs)


class Relay(PostsEvents, ServerProcess):
    """A relay process plus what a test needs to talk to it."""

    config_path: Path
    store_path: Path

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """``method path`` on this relay (as :meth:`InProcessRelay.request`: helpers take either)."""
        return httpx.request(method, self.url + path, **kwargs)


class InProcessRelay(PostsEvents):
    """The relay's app from the app factory, called in this process through WSGI: no gunicorn, no
    port. For tests of the app's rules (validation, idempotency, callers, answers) that need no
    process of their own; its upstream is still a real server (the sandbox) over loopback HTTP.
    ``http`` is an httpx client whose requests go straight into the app, so tests read the answers
    exactly as they would from a relay process.
    """

    def __init__(self, config_path: Path, **app_options: Any) -> None:
        """``app_options`` go to ``create_app`` (``start_delivery`` defaults to False here)."""
        from server import create_app
        from server.config import load_config

        self.config_path = config_path
        app_options.setdefault("start_delivery", False)
        self.app: Flask = create_app(load_config(str(config_path)), **app_options)
        self.url = "http://relay.test"
        self.http = httpx.Client(transport=httpx.WSGITransport(app=self.app), base_url=self.url)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def close(self) -> None:
        self.http.close()
        self.app.extensions["relay"].close()


RelayFactory = Callable[..., Relay]
InProcessRelayFactory = Callable[..., InProcessRelay]


def write_relay_config(path: Path, *, upstream: str, store: str, campaigns: str, **relay_keys: Any) -> Path:
    """Write a relay config; ``relay_keys`` become keys of the [relay] table."""
    lines = ["[relay]", f'upstream_url = "{upstream}"', f'store = "{store}"']
    tables = []
    for key, value in relay_keys.items():
        if isinstance(value, dict):
            tables.append(f"[relay.{key}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in value.items()))
        else:
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n" + "\n".join(tables) + "\n" + textwrap.dedent(campaigns))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def make_relay(
    tmp_dir: Path,
    upstream: str,
    pages_port: int,
    campaigns: str | None = None,
    *,
    store: str | None = None,
    port: int | None = None,
    name: str = "relay",
    workers: int = 2,
    delivery_processes: int | None = None,
    delivery_nice: int | str | None = None,
    **relay_keys: Any,
) -> Relay:
    """A relay process (not started) with its config and log in ``tmp_dir``; ``delivery_processes``
    and ``delivery_nice``: serve's flags (None: their defaults)."""
    relay_keys.setdefault("retry_base_seconds", 0.2)
    relay_keys.setdefault("retry_cap_seconds", 1.0)
    relay_keys.setdefault("rate_limits", {"per_ip": "", "per_campaign": ""})
    cfg = write_relay_config(
        tmp_dir / f"{name}.toml",
        upstream=upstream,
        store=store or f"sqlite:///{tmp_dir / 'relay.sqlite3'}",
        campaigns=campaigns if campaigns is not None else campaigns_toml(pages_port),
        **relay_keys,
    )
    args = ["serve", "--config", str(cfg), "--workers", str(workers)]
    if delivery_processes is not None:
        args += ["--delivery-processes", str(delivery_processes)]
    if delivery_nice is not None:
        args += ["--delivery-nice", str(delivery_nice)]
    relay = Relay(args, tmp_dir / f"{name}.log", port or 0)
    relay.config_path = cfg
    relay.store_path = tmp_dir / "relay.sqlite3"
    return relay


@pytest.fixture
def relay_factory(tmp_path: Path, sandbox: Sandbox, pages_port: int) -> Iterator[RelayFactory]:
    """Start relays against the sandbox: ``relay_factory(campaigns=..., store=..., **relay_keys)``."""
    started: list[Relay] = []

    def make(
        campaigns: str | None = None, *, upstream: str | None = None, start: bool = True, **kwargs: Any
    ) -> Relay:
        relay = make_relay(
            tmp_path, upstream or sandbox.url, pages_port, campaigns, name=f"relay{len(started)}", **kwargs
        )
        started.append(relay)
        return relay.start() if start else relay

    yield make
    for relay in started:
        relay.kill()


@pytest.fixture
def app_relay_factory(tmp_path: Path, sandbox: Sandbox, pages_port: int) -> Iterator[InProcessRelayFactory]:
    """Build in-process relays against the sandbox: ``app_relay_factory(campaigns=..., store=..., **relay_keys)``
    takes what ``relay_factory`` takes (but ``workers``), and ``app_options`` for ``create_app``
    (``start_delivery``, ``cpu_load``); closed (store, forwarders, engine) after the test."""
    built: list[InProcessRelay] = []

    def make(
        campaigns: str | None = None,
        *,
        upstream: str | None = None,
        app_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> InProcessRelay:
        config = make_relay(
            tmp_path, upstream or sandbox.url, pages_port, campaigns, name=f"app{len(built)}", **kwargs
        ).config_path
        built.append(InProcessRelay(config, **(app_options or {})))
        return built[-1]

    yield make
    for relay in built:
        relay.close()


@pytest.fixture
def relay(relay_factory: RelayFactory) -> Relay:
    """A relay with the default test campaigns, upstream = the sandbox."""
    return relay_factory()
