"""Group commit on the worker's event loop (server/group_commit.py), on a real asyncio loop; and
the stores' adds from one loop turn's requests: one SQLite transaction, one Redis round trip."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import greenlet
import pytest
import redis

from server import group_commit
from server.group_commit import Write
from server.outbox import Record
from server.outbox.redis import RedisStore
from server.outbox.sqlite import SQLiteStore

pytest_plugins = ["tests.redis_fixture"]


@pytest.fixture()
def loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.AbstractEventLoop]:
    """A loop of its own thread, served by group_commit; run a turn of it with :func:`_run_turns`.
    (Not the test's thread: pytest-playwright's sync API may have a loop running there.)"""
    for name in ("_hub", "_loop", "_loop_thread"):  # as they were, after the test
        monkeypatch.setattr(group_commit, name, getattr(group_commit, name))
    ready = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    def serve() -> None:
        loops.append(asyncio.new_event_loop())
        group_commit.serve(loops[0])
        ready.set()
        loops[0].run_forever()

    thread = threading.Thread(target=serve)
    thread.start()
    ready.wait(10)
    try:
        yield loops[0]
    finally:
        loops[0].call_soon_threadsafe(loops[0].stop)
        thread.join(10)
        loops[0].close()


def _run_turns(loop: asyncio.AbstractEventLoop, turns: list[Callable[[], None]]) -> None:
    """Run ``turns[0]`` in one turn of ``loop``, ``turns[1]`` in the next, ..., then a few turns
    more: each callback hands the next one to the loop, so each runs one turn after the other."""
    done = threading.Event()
    errors: list[BaseException] = []

    def step(i: int) -> None:
        if i == len(turns) + 5:
            done.set()
            return
        try:
            if i < len(turns):
                turns[i]()
        except BaseException as exc:
            errors.append(exc)
        loop.call_soon(step, i + 1)

    loop.call_soon_threadsafe(step, 0)
    assert done.wait(10), "the loop's turns did not run"
    if errors:
        raise errors[0]


def test_requests_of_one_turn_and_the_next_wait_for_one_commit_then_resume_in_order(
    loop: asyncio.AbstractEventLoop,
) -> None:
    events: list[str] = []

    def commit() -> None:
        events.append("commit")

    def request(name: str) -> None:
        events.append(f"{name} waits")
        assert group_commit.wait_for_commit(commit) is True
        events.append(f"{name} answered")

    _run_turns(
        loop,
        [
            lambda: (group_commit.run(request, "a"), group_commit.run(request, "b")),
            lambda: group_commit.run(request, "c"),  # read in the next turn: joins the same commit
        ],
    )
    assert events == ["a waits", "b waits", "c waits", "commit", "a answered", "b answered", "c answered"]


def test_a_request_after_the_commit_gets_a_commit_of_its_own(loop: asyncio.AbstractEventLoop) -> None:
    commits: list[int] = []

    def request() -> None:
        group_commit.wait_for_commit(lambda: commits.append(1))

    _run_turns(loop, [lambda: group_commit.run(request), lambda: None, lambda: None])
    assert commits == [1]
    _run_turns(loop, [lambda: group_commit.run(request)])
    assert commits == [1, 1]


def test_outside_a_request_of_the_loop_nobody_waits(loop: asyncio.AbstractEventLoop) -> None:
    def never() -> None:
        raise AssertionError("not to be run")

    assert group_commit.wait_for_commit(never) is False  # the loop's own code, not a request
    on_thread: list[bool] = []
    thread = threading.Thread(target=lambda: on_thread.append(group_commit.wait_for_commit(never)))
    thread.start()
    thread.join()
    assert on_thread == [False]  # a request thread commits by itself


def test_a_failing_commit_is_logged_and_its_requests_still_resume(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    resumed: list[str] = []

    def commit() -> None:
        raise OSError("disk on fire")

    def request(name: str) -> None:
        group_commit.wait_for_commit(commit)
        resumed.append(name)

    with caplog.at_level(logging.ERROR, logger="pingtree_relay.group_commit"):
        _run_turns(loop, [lambda: (group_commit.run(request, "a"), group_commit.run(request, "b"))])
    assert resumed == ["a", "b"]
    assert "group commit failed" in caplog.text


_LEFT_BY_A_REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("left_by_a_request")


def test_the_greenlets_of_finished_requests_run_the_next_ones(loop: asyncio.AbstractEventLoop) -> None:
    """A greenlet per request cost an mmap and a munmap of its frame stack: they are kept."""
    ran_in: list[Any] = []
    seen: list[str] = []

    def request(name: str) -> None:
        ran_in.append(greenlet.getcurrent())
        seen.append(_LEFT_BY_A_REQUEST.get("nothing"))
        _LEFT_BY_A_REQUEST.set(name)  # never reset: the next request must not see it
        if name.startswith("wait"):
            group_commit.wait_for_commit(lambda: None)

    _run_turns(loop, [lambda: group_commit.run(request, "a"), lambda: group_commit.run(request, "b")])
    assert ran_in[0] is ran_in[1]  # one after the other: the same greenlet
    # Two waiting at once need two; after their commit both are kept, and run the next two.
    _run_turns(loop, [lambda: (group_commit.run(request, "wait1"), group_commit.run(request, "wait2"))])
    _run_turns(loop, [lambda: (group_commit.run(request, "wait3"), group_commit.run(request, "wait4"))])
    assert len({id(g) for g in ran_in[2:]}) == 2 and ran_in[0] in ran_in[2:]
    assert all(g is not ran_in[0].parent for g in ran_in)  # never the loop's own greenlet
    assert seen == ["nothing"] * 6  # each starts in an empty context, as in a greenlet of its own


def test_a_request_started_by_a_request_that_waits_hands_back_to_it_at_once(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The worker starts a connection's next request from the answer of the one before, inside its
    greenlet: run() returns to that one when the next waits, and each finishes after the commit."""
    events: list[str] = []

    def second() -> None:
        events.append("second waits")
        group_commit.wait_for_commit(lambda: events.append("commit"))
        events.append("second answered")

    def first() -> None:
        group_commit.run(second)
        events.append("first done")

    _run_turns(loop, [lambda: group_commit.run(first), lambda: None, lambda: group_commit.run(first)])
    assert events == ["second waits", "first done", "commit", "second answered"] * 2
    assert len(group_commit._idle) == 2  # both kept, neither left suspended


def test_an_error_in_a_request_reaches_the_caller_and_at_most_idle_runners_are_kept(
    loop: asyncio.AbstractEventLoop,
) -> None:
    def fails() -> None:
        raise ValueError("a bug")

    def waits() -> None:
        group_commit.wait_for_commit(lambda: None)

    caught: list[BaseException] = []

    def call_failing() -> None:
        try:
            group_commit.run(fails)
        except ValueError as exc:
            caught.append(exc)

    _run_turns(loop, [call_failing])
    assert [str(e) for e in caught] == ["a bug"]
    _run_turns(loop, [lambda: [group_commit.run(waits) for _ in range(group_commit.IDLE_RUNNERS + 5)]])
    assert len(group_commit._idle) == group_commit.IDLE_RUNNERS


def _record(event_uuid: str) -> Record:
    return Record(
        id=f"cmp:{event_uuid}",
        cid="cmp",
        event_id="quote_viewed",
        transaction_id="t" * 32,
        payload={"event_uuid": event_uuid},
        received_at=time.time(),
    )


class CountingSQLiteStore(SQLiteStore):
    """The SQLite store, counting its add transactions and the rows of each."""

    def __init__(self, path: str) -> None:
        self.batches: list[int] = []
        super().__init__(path)

    def _insert_all(self, conn: Any, rows: list[tuple[Any, ...]]) -> list[bool]:
        self.batches.append(len(rows))
        return super()._insert_all(conn, rows)


class CountingRedisStore(RedisStore):
    """The Redis store, counting its round trips of adds and the adds of each."""

    def __init__(self, url: str, prefix: str) -> None:
        self.batches: list[int] = []
        super().__init__(url, prefix=prefix)

    def _add_batch(self, batch: list[Write]) -> None:
        self.batches.append(len(batch))
        super()._add_batch(batch)


@pytest.fixture(params=["sqlite", "redis"])
def counting_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> CountingSQLiteStore | CountingRedisStore:
    if request.param == "sqlite":
        return CountingSQLiteStore(str(tmp_path / "outbox.sqlite3"))
    url = request.getfixturevalue("redis_url")
    return CountingRedisStore(url, prefix=f"ptr-{uuid.uuid4().hex[:8]}:")


def test_adds_of_one_loop_turn_are_one_commit_and_a_repeat_among_them_is_found(
    loop: asyncio.AbstractEventLoop, counting_store: CountingSQLiteStore | CountingRedisStore
) -> None:
    """One transaction (SQLite) or one pipeline, one round trip (Redis), for the turn's adds."""
    store = counting_store
    answers: dict[str, tuple[str, bool]] = {}

    def request(name: str, event_uuid: str) -> None:
        stored, created = store.add(_record(event_uuid), owner=None, lease=30)
        answers[name] = (stored.id, created)

    _run_turns(
        loop,
        [
            lambda: [group_commit.run(request, f"r{i}", f"e{i}") for i in range(5)],
            lambda: group_commit.run(request, "again", "e0"),  # the same event, in the same commit
        ],
    )
    assert store.batches == [6]
    assert {name: created for name, (_, created) in answers.items()} == {
        "r0": True, "r1": True, "r2": True, "r3": True, "r4": True, "again": False,
    }  # fmt: skip
    assert answers["again"][0] == "cmp:e0"
    assert store.get("cmp:e4") is not None  # committed: another connection reads it
    stored, created = store.add(_record("e5"), owner=None, lease=30)  # not a request: at once
    assert created and store.batches == [6, 1]


def _script_calls(client: redis.Redis) -> int:
    """SCRIPT commands (EXISTS, LOAD...) the server has run so far."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_script"))


def test_a_redis_batch_is_one_round_trip_and_survives_a_flushed_script_cache(
    loop: asyncio.AbstractEventLoop, redis_url: str
) -> None:
    store = CountingRedisStore(redis_url, prefix=f"ptr-{uuid.uuid4().hex[:8]}:")
    client = store._client()
    store.add(_record("warm"), owner=None, lease=30)  # the script is loaded from here on
    before = _script_calls(client)
    created: dict[str, bool] = {}

    def request(event_uuid: str) -> None:
        created[event_uuid] = store.add(_record(event_uuid), owner=None, lease=30)[1]

    _run_turns(loop, [lambda: [group_commit.run(request, f"a{i}") for i in range(4)]])
    assert _script_calls(client) == before  # EVALSHAs only: no SCRIPT EXISTS before the batch
    client.script_flush()  # a restarted Redis: NOSCRIPT for every add of the next batch
    _run_turns(loop, [lambda: [group_commit.run(request, f"b{i}") for i in range(4)]])
    assert store.batches == [1, 4, 4]
    assert all(created.values()) and len(created) == 8
    assert all(store.get(f"cmp:b{i}") is not None for i in range(4))


def test_a_write_taken_into_another_threads_batch_returns_once_that_batch_is_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thread A's commit takes the main thread's write with its own; the main thread's commit
    must wait for A's, not find the queue empty and return without its result."""
    in_commit, release = threading.Event(), threading.Event()

    def commit_batch(batch: list[Write]) -> None:
        in_commit.set()
        assert release.wait(10)
        for write in batch:
            write.result = write.value.upper()

    queue = group_commit.CommitQueue(commit_batch)
    results: dict[str, str] = {}
    other = threading.Thread(target=lambda: results.__setitem__("a", queue.write("a")))
    real_wait = group_commit.wait_for_commit

    def wait_for_commit(commit: Callable[[], None]) -> bool:
        if threading.current_thread() is other:
            return real_wait(commit)
        other.start()  # the main thread's write is queued: A takes it into its batch
        assert in_commit.wait(10)
        release.set()
        return False  # the main thread commits by itself, while A's batch may still be going

    monkeypatch.setattr(group_commit, "wait_for_commit", wait_for_commit)
    results["m"] = queue.write("m")
    other.join(10)
    assert results == {"m": "M", "a": "A"}


def test_a_redis_error_in_a_pipelined_batch_is_each_adds_own_answer(
    loop: asyncio.AbstractEventLoop, redis_url: str
) -> None:
    store = CountingRedisStore(redis_url, prefix=f"ptr-{uuid.uuid4().hex[:8]}:")
    store._client().set(store.prefix + "ev:cmp:bad", "a string where a hash goes")  # WRONGTYPE
    answers: dict[str, Any] = {}

    def request(event_uuid: str) -> None:
        try:
            answers[event_uuid] = store.add(_record(event_uuid), owner=None, lease=30)[1]
        except redis.RedisError as exc:
            answers[event_uuid] = exc

    _run_turns(loop, [lambda: [group_commit.run(request, name) for name in ("a", "bad", "b")]])
    assert store.batches == [3]
    assert answers["a"] is True and answers["b"] is True
    assert isinstance(answers["bad"], redis.ResponseError)
