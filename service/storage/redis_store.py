"""Raft storage and applied state in Redis (layout: keys.py).

Each write is one MULTI/EXEC, so with ``appendfsync always`` it is durable and all or
nothing when the reply arrives. The stores hold no cached state: after a restart, or a
reply lost with the connection, Redis alone says what is stored.

Both stores assume one writer per Redis (the node that owns it). Only two writes read
first: saving a snapshot (it must know whether the log agrees with the snapshot, Raft's
InstallSnapshot rule, and fakeredis has no Lua to decide that inside the transaction) and
``replace_all`` (it must find the keys to drop); the write itself is still one MULTI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from service.raft.messages import Entry, HardState, Snapshot, SnapshotMeta
from service.storage import keys
from service.storage.codec import (
    decode_entry,
    decode_hard_state,
    decode_snapshot,
    encode_entry,
    encode_hard_state,
    encode_snapshot,
)
from service.storage.protocols import HashWrite, RaftStorage, StateStore
from service.storage.rules import check_write, snapshot_keeps_suffix


def _fields(mapping: Mapping[str, str | bytes]) -> dict[FieldT, EncodableT]:
    return {k: v for k, v in mapping.items()}


def _raw(fields: Mapping[bytes | str, bytes | str]) -> dict[bytes, bytes]:
    # The client is checked to return bytes (see _require_bytes_client).
    return cast(dict[bytes, bytes], fields)


def _require_bytes_client(redis: Redis) -> None:
    # Entry data and snapshots are arbitrary bytes; a decoding client would corrupt them.
    if redis.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError("dsync storage needs a Redis client with decode_responses=False")


class RedisRaftStorage:
    def __init__(self, redis: Redis) -> None:
        _require_bytes_client(redis)
        self._redis = redis
        # No log entry has an index above this, when known (this object is the only
        # writer; None after a failed write or before the first). An append that starts
        # right after it cannot meet a conflicting suffix, so it is a lone ZADD (atomic
        # by itself) instead of MULTI, ZREMRANGEBYSCORE, ZADD, EXEC: most appends, as a
        # leader never overwrites its log and a follower rarely does.
        self._log_end: int | None = None

    async def load_hard_state(self) -> HardState:
        return decode_hard_state(_raw(await self._redis.hgetall(keys.HARD_STATE)))

    async def save_hard_state(self, state: HardState) -> None:
        await self.persist(state, (), None)

    async def first_index(self) -> int:
        return (await self._bounds())[0]

    async def last_index(self) -> int:
        return (await self._bounds())[1]

    async def _bounds(self) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrange(keys.LOG, 0, 0, withscores=True)
            pipe.zrange(keys.LOG, -1, -1, withscores=True)
            pipe.hget(keys.SNAPSHOT, "index")
            head, tail, snapshot_index = await pipe.execute()
        empty_log_last = int(snapshot_index) if snapshot_index is not None else 0
        last = int(tail[0][1]) if tail else empty_log_last
        first = int(head[0][1]) if head else last + 1
        return first, last

    async def entries(self, lo: int, hi: int) -> list[Entry]:
        if hi <= lo:
            return []
        members = await self._redis.zrangebyscore(keys.LOG, lo, f"({hi}")
        return [decode_entry(m) for m in cast(list[bytes], members)]

    async def append(self, entries: Sequence[Entry]) -> None:
        await self.persist(None, entries, None)

    async def compact(self, upto: int) -> None:
        await self._redis.zremrangebyscore(keys.LOG, "-inf", upto)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.persist(None, (), snapshot)

    async def load_snapshot(self) -> Snapshot | None:
        return decode_snapshot(_raw(await self._redis.hgetall(keys.SNAPSHOT)))

    async def persist(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        check_write(entries, snapshot)
        known_end, self._log_end = self._log_end, None  # unknown until the write is done
        if (
            snapshot is None
            and hard_state is None
            and entries
            and known_end is not None
            and entries[0].index == known_end + 1
        ):
            await self._redis.zadd(keys.LOG, {encode_entry(e): e.index for e in entries})
            self._log_end = entries[-1].index
            return
        keep_suffix = snapshot is not None and await self._keeps_suffix(snapshot.meta)
        async with self._redis.pipeline(transaction=True) as pipe:
            if snapshot is not None:
                pipe.hset(keys.SNAPSHOT, mapping=_fields(encode_snapshot(snapshot)))
                if keep_suffix:
                    pipe.zremrangebyscore(keys.LOG, "-inf", snapshot.meta.index)
                else:
                    pipe.delete(keys.LOG)
            if entries:
                # Drops a follower's conflicting suffix without knowing where it ends.
                pipe.zremrangebyscore(keys.LOG, entries[0].index, "+inf")
                pipe.zadd(keys.LOG, {encode_entry(e): e.index for e in entries})
            if hard_state is not None:
                pipe.hset(keys.HARD_STATE, mapping=_fields(encode_hard_state(hard_state)))
                if hard_state.vote is None:
                    pipe.hdel(keys.HARD_STATE, "vote")
            if len(pipe):
                await pipe.execute()
        if entries:
            self._log_end = entries[-1].index
        elif snapshot is not None and not keep_suffix:
            self._log_end = snapshot.meta.index  # the log was dropped
        else:
            self._log_end = known_end

    async def _keeps_suffix(self, meta: SnapshotMeta) -> bool:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(keys.LOG, meta.index, meta.index)
            pipe.hgetall(keys.SNAPSHOT)
            at_index, stored_fields = await pipe.execute()
        term_at_index = decode_entry(at_index[0]).term if at_index else None
        stored = decode_snapshot(stored_fields)
        return snapshot_keeps_suffix(meta, term_at_index, stored.meta if stored else None)


class RedisStateStore:
    def __init__(self, redis: Redis) -> None:
        _require_bytes_client(redis)
        self._redis = redis

    async def load_applied_index(self) -> int:
        value = await self._redis.get(keys.APPLIED_INDEX)
        return int(value) if value is not None else 0

    async def apply(self, writes: Sequence[HashWrite], applied_index: int) -> None:
        for write in writes:
            keys.check_state_key(write.key)
        async with self._redis.pipeline(transaction=True) as pipe:
            for write in writes:
                if write.drop:
                    pipe.delete(write.key)
                if write.deleted:
                    pipe.hdel(write.key, *write.deleted)
                if write.fields:
                    pipe.hset(write.key, mapping=_fields(write.fields))
            pipe.set(keys.APPLIED_INDEX, applied_index)
            await pipe.execute()

    async def load_prefix(self, prefix: str) -> dict[str, dict[str, str]]:
        keys.check_state_prefix(prefix)
        names = await self._hash_keys(prefix)
        async with self._redis.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.hgetall(name)
            contents = await pipe.execute() if names else []
        return {
            name.decode(): {f.decode(): v.decode() for f, v in fields.items()}
            for name, fields in zip(names, contents, strict=True)
            if fields
        }

    async def replace_all(
        self,
        prefixes: Sequence[str],
        hashes: Mapping[str, Mapping[str, str]],
        applied_index: int,
    ) -> None:
        keys.check_replacement(prefixes, hashes)
        old = [name for prefix in prefixes for name in await self._hash_keys(prefix)]
        async with self._redis.pipeline(transaction=True) as pipe:
            if old:
                pipe.delete(*old)
            for name, fields in hashes.items():
                if fields:
                    pipe.hset(name, mapping=_fields(fields))
            pipe.set(keys.APPLIED_INDEX, applied_index)
            await pipe.execute()

    async def _hash_keys(self, prefix: str) -> list[bytes]:
        # Only hashes: a service may keep other types (queue streams) under its prefix,
        # and those are not part of the materialised state this store owns.
        found = self._redis.scan_iter(match=keys.scan_pattern(prefix), count=1000, _type="hash")
        # SCAN may return a key more than once while the keyspace is rehashing.
        return list(dict.fromkeys([name async for name in found]))


def _conforms(raft: RedisRaftStorage, state: RedisStateStore) -> tuple[RaftStorage, StateStore]:
    # Never called: mypy checks here that the classes satisfy the Protocols.
    return raft, state
