"""A real ``redis-server`` for the tests, as a pytest plugin (``pytest_plugins = ["tests.redis_fixture"]``).

One server per session on a loopback port (see :class:`RedisServer`), with persistence off (``--save ""``,
``--appendonly no``) and its working directory in the session's temporary folder; killed at the end.
A missing ``redis-server`` is a test *failure*, not a skip: CI installs it, and a silently skipped
Redis backend would let the multi-node path rot. ``PTR_ALLOW_NO_REDIS=1`` turns it into a skip for a
laptop without Redis.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
import redis

from bench.servers import Server, free_port, redis_args, redis_ping

__all__ = ["RedisServer", "free_port", "redis_binary"]


class RedisServer(Server):
    """One ``redis-server`` process on ``127.0.0.1:port``.

    redis-server cannot bind port 0 and report the port it got, so it starts on a :func:`free_port`
    and :class:`~bench.servers.Server` retries on another one if that was taken meanwhile (redis
    exits saying "Address already in use"). A restart binds the port it had.
    """

    def __init__(self, binary: str, workdir: Path, port: int = 0) -> None:
        super().__init__(
            redis_args(workdir, aof=False, binary=binary),
            workdir / "redis.log",
            port=port,
            health_path="",
        )
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> Self:
        super().start(timeout)
        return self

    def _healthy(self) -> bool:
        return redis_ping(self.port)

    def log(self) -> str:
        return self.log_tail()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def flush(self) -> None:
        with self.client() as c:
            c.flushall()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGKILL: the tests' Redis has nothing to save, and a restart test wants it gone at once."""
        return self.kill()


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
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty Redis database."""
    redis_server.flush()
    return redis_server.url
