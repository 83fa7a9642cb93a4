"""The Redis outbox: one queue shared by relay processes on several machines.

Layout (every key under ``prefix``, ``ptr:`` by default)::

    ptr:ev:{id}            hash    one record; field names are Record's, None is an absent field
    ptr:due                zset    id -> next_at, pending records only (a leased one scores at its
                                   lease expiry, so an abandoned lease becomes due by itself)
    ptr:recv               zset    id -> received_at, every record (newest-first listing, timeline)
    ptr:state:{state}      zset    id -> received_at, per state (counts, oldest pending, filters)
    ptr:upd:{state}        zset    id -> updated_at, delivered and dead only (purge by age)
    ptr:cid:{cid}          zset    id -> received_at (filter and re-queue by campaign)
    ptr:txn:{transaction}  zset    id -> received_at (filter by transaction_id)
    ptr:dedupe:{key}       string  the id of the one *live* record holding a dedupe key

Why not Streams and consumer groups: a stream entry is delivered to one consumer and then sits in
that consumer's pending list until XACK; a retry "in 30 s with backoff" has no place in that model
(it would need a second, delayed structure anyway) and XAUTOCLAIM reclaims by idle time only, with no
per-record due time. A due-time sorted set is the model the SQLite backend already uses
(``state, next_at``): a claim is "due entries, lowest score first", a lease is simply re-scoring the
entry to ``now + lease``, and backoff is scoring it to ``now + delay``. So both backends share one
state machine and one contract test.

Atomicity: every state change is one Lua script (``claim``, ``finish``, ...), so two relays
claiming at once are serialised by Redis and can never lease the same record, and the record hash
and its index entries never disagree. Times inside scripts come from Redis ``TIME``: leases are
granted and checked against one clock, so clock skew between relay machines cannot expire a lease
early (``next_at`` given to ``finish`` is the worker's clock; skew only shifts a retry's moment).

Limits: the scripts touch keys they compute, so this needs one Redis primary (standalone or
Sentinel), not Redis Cluster. Durability is Redis's: run it with ``appendonly yes`` and
``appendfsync everysec`` (or ``always``) or an acknowledged event can be lost with the Redis host.
The store checks this at start (``CONFIG GET appendonly`` / ``save``), warns when it is off or
cannot be verified (managed Redis often forbids CONFIG), and readiness reports it.

Adds of the requests one worker's loop reads together go as one pipeline of ``add`` scripts, one
round trip (server/group_commit.py); not a ``MULTI``: each script is atomic by itself and one add's
error must not undo its neighbours'.

A Redis that refuses writes (``OOM`` at ``maxmemory``, ``MISCONF`` after a failed snapshot) still
answers PING: readiness is a real write (:meth:`RedisStore.check_writable`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from ..group_commit import CommitQueue, Write
from . import STATES, Outcome, Persistence, Record, State, Stats, Store, payload_json
from .schema import check_redis

log = logging.getLogger("pingtree_relay.outbox")

PERSISTENCE_RECHECK_SECONDS = 60.0  # CONFIG can change at run time; no need to ask on every probe

# --- Lua ----------------------------------------------------------------------------------------
# ARGV[1] is always the key prefix. "" stands for None in arguments.

_PRELUDE = """
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- Lua's own tostring keeps 14 digits (0.1 ms on a Unix time): format times explicitly.
local function fmt(x) return string.format('%.6f', x) end
local function set_or_del(key, field, value)
  if value == '' then redis.call('HDEL', key, field) else redis.call('HSET', key, field, value) end
end
local function is_live(id)
  local st = redis.call('HGET', P .. 'ev:' .. id, 'state')
  return st and st ~= 'dead'
end
"""

# KEYS: none. ARGV: prefix, id, dedupe_key, owner, lease, legacy id, cid, then field/value pairs of
# the new record. The legacy id is the bare event_uuid a record stored before ids were scoped has:
# for its own campaign it is the same event.
_ADD = (
    _PRELUDE
    + """
local id, dkey, owner, lease = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local legacy, cid = ARGV[6], ARGV[7]
local ev = P .. 'ev:' .. id
if redis.call('EXISTS', ev) == 1 then return {0, id} end
if legacy ~= '' and redis.call('HGET', P .. 'ev:' .. legacy, 'cid') == cid then return {0, legacy} end
if dkey ~= '' then
  local holder = redis.call('GET', P .. 'dedupe:' .. dkey)
  if holder and is_live(holder) then return {0, holder} end
end
local t = now()
local next_at, attempts = t, 0
if owner ~= '' then next_at, attempts = t + lease, 1 end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', ev, unpack(fields))
redis.call('HSET', ev, 'state', 'pending', 'attempts', attempts, 'next_at', fmt(next_at),
           'uncertain', '0', 'updated_at', fmt(t))
if owner ~= '' then redis.call('HSET', ev, 'lease_owner', owner) end
local cur = redis.call('HMGET', ev, 'received_at', 'cid', 'transaction_id')
redis.call('ZADD', P .. 'due', fmt(next_at), id)
redis.call('ZADD', P .. 'recv', cur[1], id)
redis.call('ZADD', P .. 'state:pending', cur[1], id)
redis.call('ZADD', P .. 'cid:' .. cur[2], cur[1], id)
redis.call('ZADD', P .. 'txn:' .. cur[3], cur[1], id)
if dkey ~= '' then redis.call('SET', P .. 'dedupe:' .. dkey, id) end
return {1, fmt(t), fmt(next_at)}
"""
)

# ARGV: prefix, owner, limit, lease. Returns a list of HGETALL replies of the claimed records.
_CLAIM = (
    _PRELUDE
    + """
local owner, limit, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = now()
local ids = redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', fmt(t), 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(ids) do
  local ev = P .. 'ev:' .. id
  if redis.call('HGET', ev, 'state') ~= 'pending' then
    redis.call('ZREM', P .. 'due', id)  -- a stale index entry; never expected
  else
    -- An owner still set on a due record: its worker died or hung mid-delivery, and that attempt
    -- may have reached Pingtree. A later "Duplicate event" then means it did.
    if redis.call('HEXISTS', ev, 'lease_owner') == 1 then redis.call('HSET', ev, 'uncertain', '1') end
    local expires = fmt(t + lease)
    redis.call('HINCRBY', ev, 'attempts', 1)
    redis.call('HSET', ev, 'lease_owner', owner, 'next_at', expires, 'updated_at', fmt(t))
    redis.call('ZADD', P .. 'due', expires, id)
    out[#out + 1] = redis.call('HGETALL', ev)
  end
end
return out
"""
)

# ARGV: prefix, then per outcome 10 values: id, owner, state, next_at, status, answer, error,
# uncertain (0/1), latency_ms, attempts ('' : not checked). Returns one 1/0 per outcome (0: the
# owner no longer held the lease, or holds a later one: Outcome.attempts).
_FINISH = (
    _PRELUDE
    + """
local t = fmt(now())
local function finish(id, owner, state, next_at, status, answer, err, uncertain, latency, attempts)
  local ev = P .. 'ev:' .. id
  local cur = redis.call('HMGET', ev, 'state', 'lease_owner', 'received_at', 'dedupe_key', 'attempts')
  if cur[1] ~= 'pending' or cur[2] ~= owner then return 0 end
  if attempts ~= '' and cur[5] ~= attempts then return 0 end
  redis.call('HDEL', ev, 'lease_owner')
  redis.call('HSET', ev, 'state', state, 'next_at', next_at, 'updated_at', t)
  set_or_del(ev, 'last_status', status)
  set_or_del(ev, 'last_answer', answer)
  set_or_del(ev, 'last_error', err)
  set_or_del(ev, 'latency_ms', latency)
  if uncertain == '1' then redis.call('HSET', ev, 'uncertain', '1') end
  if state == 'pending' then
    redis.call('ZADD', P .. 'due', next_at, id)
    return 1
  end
  if state == 'delivered' then redis.call('HSET', ev, 'delivered_at', t) end
  redis.call('ZREM', P .. 'due', id)
  redis.call('ZREM', P .. 'state:pending', id)
  redis.call('ZADD', P .. 'state:' .. state, cur[3], id)
  redis.call('ZADD', P .. 'upd:' .. state, t, id)
  -- A dead record gives its dedupe key up, so the lead can fire the event again.
  if state == 'dead' and cur[4] and redis.call('GET', P .. 'dedupe:' .. cur[4]) == id then
    redis.call('DEL', P .. 'dedupe:' .. cur[4])
  end
  return 1
end
local out = {}
for i = 2, #ARGV, 10 do
  out[#out + 1] = finish(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5],
                         ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], ARGV[i + 9])
end
return out
"""
)

# ARGV: prefix, owner, ids...
_RELEASE = (
    _PRELUDE
    + """
local owner, t, n = ARGV[2], fmt(now()), 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local ev = P .. 'ev:' .. id
  local cur = redis.call('HMGET', ev, 'state', 'lease_owner', 'attempts')
  if cur[1] == 'pending' and cur[2] == owner then
    -- attempts was counted at claim; this attempt never happened.
    redis.call('HDEL', ev, 'lease_owner')
    redis.call('HSET', ev, 'next_at', t, 'attempts', math.max(0, tonumber(cur[3]) - 1))
    redis.call('ZADD', P .. 'due', t, id)
    n = n + 1
  end
end
return n
"""
)

# ARGV: prefix, ids...
_REQUEUE = (
    _PRELUDE
    + """
local t, n = fmt(now()), 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local ev = P .. 'ev:' .. id
  local cur = redis.call('HMGET', ev, 'state', 'dedupe_key', 'received_at')
  local ok = cur[1] == 'dead'
  if ok and cur[2] then
    -- A live record with the same dedupe key came in meanwhile: re-queueing would duplicate it.
    local key = P .. 'dedupe:' .. cur[2]
    local holder = redis.call('GET', key)
    if holder and holder ~= id and is_live(holder) then ok = false else redis.call('SET', key, id) end
  end
  if ok then
    redis.call('HDEL', ev, 'lease_owner')
    redis.call('HSET', ev, 'state', 'pending', 'next_at', t, 'updated_at', t, 'requeued_at', t)
    redis.call('ZREM', P .. 'state:dead', id)
    redis.call('ZREM', P .. 'upd:dead', id)
    redis.call('ZADD', P .. 'state:pending', cur[3], id)
    redis.call('ZADD', P .. 'due', t, id)
    n = n + 1
  end
end
return n
"""
)

# ARGV: prefix, state, older_than, batch. Returns {entries looked at, records deleted}.
_PURGE = (
    _PRELUDE
    + """
local state, batch = ARGV[2], tonumber(ARGV[4])
local cutoff = fmt(now() - tonumber(ARGV[3]))
local ids = redis.call('ZRANGEBYSCORE', P .. 'upd:' .. state, '-inf', cutoff, 'LIMIT', 0, batch)
local n = 0
for _, id in ipairs(ids) do
  local ev = P .. 'ev:' .. id
  local cur = redis.call('HMGET', ev, 'state', 'cid', 'transaction_id', 'dedupe_key')
  redis.call('ZREM', P .. 'upd:' .. state, id)
  if cur[1] == state then
    redis.call('DEL', ev)
    redis.call('ZREM', P .. 'recv', id)
    redis.call('ZREM', P .. 'state:' .. state, id)
    redis.call('ZREM', P .. 'due', id)
    redis.call('ZREM', P .. 'cid:' .. cur[2], id)
    redis.call('ZREM', P .. 'txn:' .. cur[3], id)
    if cur[4] and redis.call('GET', P .. 'dedupe:' .. cur[4]) == id then
      redis.call('DEL', P .. 'dedupe:' .. cur[4])
    end
    n = n + 1
  end
end
return {#ids, n}
"""
)

_SCRIPTS = {
    "add": _ADD,
    "claim": _CLAIM,
    "finish": _FINISH,
    "release": _RELEASE,
    "requeue": _REQUEUE,
    "purge": _PURGE,
}

_FLOATS = frozenset({"received_at", "next_at", "updated_at", "delivered_at", "latency_ms", "requeued_at"})
_INTS = frozenset({"attempts", "last_status"})
_BATCH = 500  # ids per script call or pipeline: long scripts block every other Redis client


def _opt(value: Any) -> str:
    """A script argument; ``""`` stands for None."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _decode(flat: list[str] | dict[str, str]) -> Record:
    """A Record from an ``HGETALL`` reply (a dict, or the flat list a script returns)."""
    raw = flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))
    data: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _FLOATS:
            data[name] = float(value)
        elif name in _INTS:
            data[name] = int(value)
        elif name in ("payload", "last_answer"):
            data[name] = json.loads(value)
        elif name == "uncertain":
            data[name] = value == "1"
        else:
            data[name] = value
    return Record(**data)


class RedisStore(Store):
    """:class:`server.outbox.Store` on one Redis; a connection pool per process."""

    def __init__(self, url: str, *, prefix: str = "ptr:") -> None:
        self.url = url
        self.prefix = prefix
        self._pid = -1
        self._redis: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._adds = CommitQueue(self._add_batch)  # group commit: server/group_commit.py
        self._client()  # fail at start-up, not on the first event, when the URL is wrong
        try:
            check_redis(self._client(), prefix, f"the Redis outbox {redis_location(url)}")
        except redis.ConnectionError:
            pass  # Redis down at start: /readyz says so; the version is checked at the next start
        self._persistence: tuple[float, Persistence] | None = None
        found = self.persistence()
        if found.state != "ok":
            log.warning("Redis persistence: %s", found.detail)

    def _client(self) -> redis.Redis:
        # A pool's sockets must not cross a fork: each gunicorn worker builds its own client.
        # (Dropping the parent's client here is safe: redis-py never shuts down a socket it
        # did not open in this process.)
        if self._redis is None or self._pid != os.getpid():
            client = redis.Redis.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=5.0,
                socket_connect_timeout=3.0,
                health_check_interval=30,
                # A script run twice does no harm (a repeat finds the work done; a claim whose reply
                # was lost waits out its lease, then goes out as uncertain), so retry broken calls.
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
            )
            self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
            self._redis, self._pid = client, os.getpid()
        return self._redis

    def _run(self, script: str, *args: Any) -> Any:
        self._client()
        return self._scripts[script](keys=[], args=[self.prefix, *args])

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- the accept path ------------------------------------------------------------------------

    def add(self, record: Record, *, owner: str | None, lease: float) -> tuple[Record, bool]:
        fields = [
            "id",
            record.id,
            "cid",
            record.cid,
            "event_id",
            record.event_id,
            "transaction_id",
            record.transaction_id,
            "payload",
            payload_json(record.payload),
            "received_at",
            repr(float(record.received_at)),
        ]
        if record.dedupe_key:
            fields += ["dedupe_key", record.dedupe_key]
        if record.fingerprint:
            fields += ["fingerprint", record.fingerprint]
        if record.requeued_at is not None:  # set only by outbox move (a requeued record keeps its window)
            fields += ["requeued_at", repr(float(record.requeued_at))]
        legacy = record.event_uuid if record.event_uuid != record.id else ""
        reply = self._adds.write(
            (record.id, record.dedupe_key or "", owner or "", repr(float(lease)), legacy, record.cid, *fields)
        )
        if int(reply[0]) == 1:
            now, next_at = float(reply[1]), float(reply[2])
            record.state, record.lease_owner, record.updated_at = "pending", owner, now
            record.attempts, record.next_at = (1 if owner else 0), next_at
            return record, True
        existing = self.get(reply[1])
        if existing is None:  # purged in between: try once more
            return self.add(record, owner=owner, lease=lease)
        return existing, False

    def _add_batch(self, batch: list[Write]) -> None:
        """The ``add`` script for each of ``batch``: one call alone, or one pipeline of ``EVALSHA``s
        (one round trip; not a transaction: each script is atomic by itself, and each reply or
        error is its own). Queued as bare ``EVALSHA``s: a registered script in a pipeline would cost a
        ``SCRIPT EXISTS`` round trip before every batch. An add answered ``NOSCRIPT`` (a restarted or
        failed-over Redis) runs again alone, which loads the script (running one twice is harmless)."""
        if len(batch) == 1:
            self._add_alone(batch[0])
            return
        client = self._client()
        script = self._scripts["add"]
        pipe = client.pipeline(transaction=False)
        for add in batch:
            pipe.evalsha(script.sha, 0, self.prefix, *add.value)
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            for add in batch:  # each its own error (one object raised by many would pile up frames)
                add.error = copy.copy(exc)
                add.error.__cause__ = exc
            return
        for add, reply in zip(batch, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                self._add_alone(add)
            elif isinstance(reply, Exception):
                add.error = reply
            else:
                add.result = reply

    def _add_alone(self, add: Write) -> None:
        try:
            add.result = self._run("add", *add.value)
        except redis.RedisError as exc:
            add.error = exc

    # --- delivery ----------------------------------------------------------------------------------

    def claim(self, owner: str, limit: int, lease: float) -> list[Record]:
        if limit <= 0:
            return []
        return [_decode(flat) for flat in self._run("claim", owner, int(limit), repr(float(lease)))]

    def finish_many(self, outcomes: Sequence[Outcome]) -> list[bool]:
        done: list[bool] = []
        for i in range(0, len(outcomes), _BATCH):  # one script call (one round trip) per batch
            args: list[str] = []
            for o in outcomes[i : i + _BATCH]:
                args += [
                    o.record_id,
                    o.owner,
                    o.state,
                    repr(float(o.next_at)),
                    _opt(o.status),
                    json.dumps(o.answer) if o.answer is not None else "",
                    o.error or "",
                    "1" if o.uncertain else "0",
                    _opt(None if o.latency_ms is None else float(o.latency_ms)),
                    "" if o.attempts is None else str(int(o.attempts)),
                ]
            done += [int(flag) == 1 for flag in self._run("finish", *args)]
        return done

    def backlog(self, limit: int) -> int:
        # Leased records score at their lease end, so "due now" is exactly the unclaimed backlog.
        # This process's clock, not Redis TIME: skew only shifts the moment a retry counts.
        return min(limit, int(self._client().zcount(self._key("due"), "-inf", repr(time.time()))))

    def release(self, record_ids: Iterable[str], owner: str) -> int:
        ids = list(record_ids)
        return sum(int(self._run("release", owner, *ids[i : i + _BATCH])) for i in range(0, len(ids), _BATCH))

    # --- reading and operating ---------------------------------------------------------------------

    def get(self, record_id: str) -> Record | None:
        # decode_responses=True: every reply is str (redis-py's types also allow bytes).
        raw = cast(dict[str, str], self._client().hgetall(self._key("ev", record_id)))
        return _decode(raw) if raw else None

    def _get_many(self, ids: list[str]) -> list[Record | None]:
        pipe = self._client().pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(self._key("ev", rid))
        return [_decode(raw) if raw else None for raw in pipe.execute()]

    def find(
        self,
        *,
        state: State | None = None,
        cid: str | None = None,
        event_id: str | None = None,
        transaction_id: str | None = None,
        limit: int = 50,
    ) -> list[Record]:
        # Walk the smallest applicable index newest-first and filter the rest here.
        candidates = [self._key("txn", transaction_id)] if transaction_id else []
        candidates += [self._key("cid", cid)] if cid else []
        candidates += [self._key("state", state)] if state else []
        index = self._key("recv")
        if candidates:
            pipe = self._client().pipeline(transaction=False)
            for key in candidates:
                pipe.zcard(key)
            index = min(zip(pipe.execute(), candidates, strict=True))[1]
        wanted = {"state": state, "cid": cid, "event_id": event_id, "transaction_id": transaction_id}
        out: list[Record] = []
        seen: set[str] = set()
        start, page = 0, max(limit * 2, 100)
        while len(out) < limit:
            ids = cast(list[str], self._client().zrevrange(index, start, start + page - 1))
            if not ids:
                break
            for record in self._get_many(ids):
                if record is None or record.id in seen:
                    continue  # purged meanwhile, or shifted onto this page by a newer event
                seen.add(record.id)
                if all(not v or getattr(record, k) == v for k, v in wanted.items()):
                    out.append(record)
                    if len(out) == limit:
                        break
            start += page
        return out

    def stats(self) -> Stats:
        pipe = self._client().pipeline(transaction=False)
        for state in STATES:
            pipe.zcard(self._key("state", state))
        pipe.zrange(self._key("state", "pending"), 0, 0, withscores=True)
        *counts, oldest = pipe.execute()
        age = max(0.0, time.time() - oldest[0][1]) if oldest else 0.0
        return Stats(counts=dict(zip(STATES, (int(n) for n in counts), strict=True)), oldest_pending_age=age)

    def requeue(self, *, ids: Iterable[str] = (), cid: str | None = None, everything: bool = False) -> int:
        client = self._client()
        if everything:
            targets = cast(list[str], client.zrange(self._key("state", "dead"), 0, -1))
        elif cid:
            ids_of_cid = cast(list[str], client.zrange(self._key("cid", cid), 0, -1))
            pipe = client.pipeline(transaction=False)
            for rid in ids_of_cid:
                pipe.zscore(self._key("state", "dead"), rid)
            targets = [rid for rid, dead in zip(ids_of_cid, pipe.execute(), strict=True) if dead is not None]
        else:
            targets = list(ids)
        return sum(
            int(self._run("requeue", *targets[i : i + _BATCH])) for i in range(0, len(targets), _BATCH)
        )

    def purge(self, *, state: str, older_than: float = 0.0) -> int:
        if state not in ("delivered", "dead"):
            raise ValueError("only delivered or dead records can be purged")
        total = 0
        while True:
            looked, deleted = self._run("purge", state, repr(float(older_than)), _BATCH)
            total += int(deleted)
            if int(looked) < _BATCH:
                return total

    def timeline(self, since: float) -> list[tuple[int, str, int]]:
        client = self._client()
        counts: dict[tuple[int, str], int] = {}
        offset = 0
        while True:
            ids = cast(
                list[str], client.zrangebyscore(self._key("recv"), since, "+inf", start=offset, num=_BATCH)
            )
            if not ids:
                break
            pipe = client.pipeline(transaction=False)
            for rid in ids:
                pipe.hmget(self._key("ev", rid), "received_at", "state", "attempts")
            for received, state, attempts in pipe.execute():
                if received is None:
                    continue
                if state == "pending":
                    state = "retrying" if int(attempts) > 0 else "queued"
                key = (int(float(received) // 60) * 60, state)
                counts[key] = counts.get(key, 0) + 1
            offset += len(ids)
        return [(minute, outcome, n) for (minute, outcome), n in sorted(counts.items())]

    def ping(self) -> bool:
        try:
            return bool(self._client().ping())
        except redis.RedisError:
            return False

    def check_writable(self) -> str | None:
        try:
            # A plain write Redis refuses in the same cases as the scripts: OOM, MISCONF, READONLY.
            self._client().set(self._key("write_probe"), repr(time.time()), px=60_000)
        except redis.RedisError as exc:
            return f"Redis refuses writes: {type(exc).__name__}: {exc}"
        return None

    def persistence(self) -> Persistence:
        now = time.monotonic()
        if self._persistence is None or now - self._persistence[0] > PERSISTENCE_RECHECK_SECONDS:
            self._persistence = (now, self._ask_persistence())
        return self._persistence[1]

    def _ask_persistence(self) -> Persistence:
        try:
            client = self._client()
            aof = client.config_get("appendonly").get("appendonly")
            fsync = client.config_get("appendfsync").get("appendfsync")
            save = client.config_get("save").get("save")
        except redis.ResponseError as exc:  # CONFIG renamed away or not permitted (managed Redis, ACL)
            return Persistence(
                "unknown",
                f"cannot verify (CONFIG GET refused: {exc}); make sure Redis "
                "runs with appendonly yes, or a restart loses queued events",
            )
        except redis.RedisError as exc:
            return Persistence("unknown", f"cannot verify: {exc}")
        if aof == "yes":
            return Persistence("ok", f"appendonly yes, appendfsync {fsync}")
        if save:
            return Persistence(
                "snapshots",
                f"RDB snapshots only (save {save}): a Redis restart loses the "
                "events queued since the last snapshot; set appendonly yes",
            )
        return Persistence(
            "off",
            "appendonly no and no RDB snapshots: a Redis restart loses every "
            "queued event; set appendonly yes",
        )

    def close(self) -> None:
        if self._redis is not None and self._pid == os.getpid():
            self._redis.close()
        self._redis = None


def redis_location(url: str) -> str:
    """``host:port/db`` of a Redis URL, without a password (for messages)."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1]
