"""A real ``redis-server`` for the tests, as a pytest plugin (``pytest_plugins = ["tests.redis_fixture"]``).

One server per session on a free loopback port, with persistence off (``--save ""``,
``--appendonly no``) and its working directory in the session's temporary folder; killed at the end.
A missing ``redis-server`` is a test *failure*, not a skip: CI installs it, and a silently skipped
Redis backend would let the multi-node path rot. ``PTR_ALLOW_NO_REDIS=1`` turns it into a skip for a
laptop without Redis.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child process owns it
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def flush(self) -> None:
        with self.client() as c:
            c.flushall()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(10)


def redis_binary() -> str:
    """The ``redis-server`` path, or fail (skip with ``PTR_ALLOW_NO_REDIS=1``) with a clear message."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary:
        return binary
    message = (
        "redis-server is not installed: the Redis outbox cannot be tested. Install it "
        "(apt-get install redis-server) or set PTR_ALLOW_NO_REDIS=1 to skip these tests."
    )
    if os.environ.get("PTR_ALLOW_NO_REDIS") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running ``redis-server`` for the whole session (empty it per test with ``redis_url``)."""
    server = RedisServer(redis_binary(), _free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty Redis database."""
    redis_server.flush()
    return redis_server.url
