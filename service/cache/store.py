"""Where a node keeps its cache state: its lines and the directory entries it homes.

Why a store of its own rather than the Raft state store: cache state is per node and
changes at cache speed (every miss, write and invalidation), so it never goes through the
log; each node mirrors its own cores into its own Redis, and a restarted node reloads
them (`LineCache.restore`, `Directory.restore`).

Redis layout (readable with redis-cli):

    dsync:cache:line:<key>      hash  this node's line while it is E or M (or evicting) or
                                      holds a hand-off record (recovery.py): state,
                                      version, txn, value, evicting; h_* fields: the
                                      record (an I line with a record is a "tombstone")
    dsync:cache:dir:<key>       hash  the directory entry of a key this node homes: state,
                                      owner, owner_txn, owner_req, sharers (JSON), version,
                                      txn, value; fwd_* fields: a forward in progress
    dsync:cache:dir:            hash  (key "") the retired floor: txn, version (directory.py)
    dsync:cache:incarnation     string  counts this node's cache starts (request ids)

Every `persist` is one atomic script call (storage/write_batch.py), and with
`appendfsync always` it is durable when the reply arrives: the runtime sends and answers
nothing that depends on a write before its `persist` returns. Within one batch only the
last write of each hash counts, and a hash is replaced whole (DEL + HSET), since a line
that turns I must lose its `value` field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from service.cache.messages import PersistEntry, PersistLine
from service.storage.codec import as_text
from service.storage.write_batch import WriteBatch, write_batch_script

LINE_PREFIX = "dsync:cache:line:"
DIR_PREFIX = "dsync:cache:dir:"
INCARNATION_KEY = "dsync:cache:incarnation"
_SCAN_COUNT = 1_000
_LOAD_CHUNK = 500

Persist = PersistLine | PersistEntry
Hashes = dict[str, dict[str, str]]


@dataclass
class StoredCache:
    lines: Hashes = field(default_factory=dict)  # key -> line hash
    entries: Hashes = field(default_factory=dict)  # key -> directory hash


class CacheStore(Protocol):
    async def persist(self, writes: Sequence[Persist]) -> None:
        """Apply the writes atomically and durably (one transaction)."""
        ...

    async def load(self) -> StoredCache:
        """Everything persisted: this node's lines and the directory entries it homes."""
        ...

    async def next_incarnation(self) -> int:
        """1 on the first start of this node's cache, then 2, 3, ... (durably)."""
        ...


class LocalCacheStore(CacheStore, Protocol):
    """A store on this node's own disk: also says whether it ever started, and can take
    back a copy of itself from a peer's mirror (mirror_store.py) after the disk was lost."""

    async def incarnation(self) -> int:
        """The last incarnation `next_incarnation` gave; 0 if this store never started."""
        ...

    async def restore(self, stored: StoredCache, incarnation: int) -> None:
        """Write `stored` and set the incarnation, in one transaction."""
        ...


def _latest(writes: Sequence[Persist]) -> dict[tuple[bool, str], dict[str, str] | None]:
    """(is_directory, key) -> the last fields written in this batch (None: delete)."""
    latest: dict[tuple[bool, str], dict[str, str] | None] = {}
    for write in writes:
        directory = isinstance(write, PersistEntry)
        latest[(directory, write.key)] = write.fields
    return latest


def redis_key(directory: bool, key: str) -> str:
    return (DIR_PREFIX if directory else LINE_PREFIX) + key


# --- memory ----------------------------------------------------------------------------


@dataclass
class MemoryCacheStore:
    """For tests and for a node before its Redis is up; `crash()` keeps what was stored."""

    lines: Hashes = field(default_factory=dict)
    entries: Hashes = field(default_factory=dict)
    started: int = 0  # the incarnation
    persists: int = 0  # calls, for tests of batching

    async def persist(self, writes: Sequence[Persist]) -> None:
        self.persists += 1
        for (directory, key), fields in _latest(writes).items():
            table = self.entries if directory else self.lines
            if fields is None:
                table.pop(key, None)
            else:
                table[key] = dict(fields)

    async def load(self) -> StoredCache:
        return StoredCache(
            {k: dict(v) for k, v in self.lines.items()},
            {k: dict(v) for k, v in self.entries.items()},
        )

    async def next_incarnation(self) -> int:
        self.started += 1
        return self.started

    async def incarnation(self) -> int:
        return self.started

    async def restore(self, stored: StoredCache, incarnation: int) -> None:
        self.lines.update((k, dict(v)) for k, v in stored.lines.items())
        self.entries.update((k, dict(v)) for k, v in stored.entries.items())
        self.started = incarnation

    def crash(self) -> MemoryCacheStore:
        return MemoryCacheStore(dict(self.lines), dict(self.entries), self.started)


# --- Redis -----------------------------------------------------------------------------


class RedisCacheStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = write_batch_script(redis)

    async def persist(self, writes: Sequence[Persist]) -> None:
        latest = _latest(writes)
        if not latest:
            return
        batch = WriteBatch()
        for (directory, key), fields in latest.items():
            name = redis_key(directory, key)
            batch.delete(name)
            if fields:
                batch.hset(name, fields)
        await batch.execute(self._script)

    async def load(self) -> StoredCache:
        return StoredCache(await self._load(LINE_PREFIX), await self._load(DIR_PREFIX))

    async def next_incarnation(self) -> int:
        return int(await self._redis.incr(INCARNATION_KEY))

    async def incarnation(self) -> int:
        raw = await self._redis.get(INCARNATION_KEY)
        return 0 if raw is None else int(raw)

    async def restore(self, stored: StoredCache, incarnation: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for directory, hashes in ((False, stored.lines), (True, stored.entries)):
                for key, fields in hashes.items():
                    name = redis_key(directory, key)
                    pipe.delete(name)
                    if fields:
                        pipe.hset(name, mapping=fields)  # type: ignore[arg-type]
            pipe.set(INCARNATION_KEY, incarnation)
            await pipe.execute()

    async def _load(self, prefix: str) -> Hashes:
        names: list[bytes] = [
            name async for name in self._redis.scan_iter(match=f"{prefix}*", count=_SCAN_COUNT)
        ]
        out: Hashes = {}
        for start in range(0, len(names), _LOAD_CHUNK):
            chunk = names[start : start + _LOAD_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in chunk:
                    pipe.hgetall(name)
                found = await pipe.execute(raise_on_error=False)
            for name, fields in zip(chunk, found, strict=True):
                if not isinstance(fields, dict) or not fields:
                    continue  # gone meanwhile, or not a hash (someone else's key)
                key = as_text(name)[len(prefix) :]
                out[key] = {as_text(f): as_text(v) for f, v in fields.items()}
        return out


__all__ = [
    "DIR_PREFIX",
    "INCARNATION_KEY",
    "LINE_PREFIX",
    "CacheStore",
    "LocalCacheStore",
    "MemoryCacheStore",
    "RedisCacheStore",
    "StoredCache",
    "redis_key",
]
