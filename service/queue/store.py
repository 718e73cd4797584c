"""Where a node keeps the partitions it replicates: Redis Streams and hashes (or memory).

Redis layout of partition P of queue Q (readable with redis-cli):

    dsync:q:Q:P            stream  one entry per message, entry id `<offset>-0`,
                                   fields id, body (JSON text) and key (when it has one)
    dsync:q:Q:P:meta       hash    epoch, seq, stamp (the replicated op stream's
                                   position), end, trimmed
    dsync:q:Q:P:ids        hash    message id -> offset (the dedup window)
    dsync:q:Q:P:g:G        hash    group G: next, p:<offset> = visible_at|visibility_ms|
                                   count|consumer (pending), w:<offset> (set aside)
    dsync:q:Q:P:dead       stream  dead letters: group, count, offset, id, key, body

Every save is one atomic script call (storage/write_batch.py; a full copy, one MULTI/EXEC):
with `appendfsync always`, durable and all-or-nothing when the reply arrives, so a replica
acknowledges only what survives kill -9.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis

from service.queue.partition import (
    MAX_DEAD_KEPT,
    DeadLetter,
    Group,
    Message,
    PartitionState,
    Writes,
    parse_pending_field,
    pending_field,
)
from service.storage.codec import as_text
from service.storage.write_batch import WriteBatch, write_batch_script

PREFIX = "dsync:q:"


@dataclass(frozen=True, slots=True)
class Position:
    """How far a replica is in its partition's op stream, and under which leader."""

    epoch: int = 0  # the partition epoch this replica last accepted ops under
    seq: int = 0  # ops applied
    # Stamp of the leadership that made op `seq`: unique per leader incarnation (a leader
    # restarted in the same epoch gets a new one), so equal (seq, stamp) means equal
    # histories and anything else is checked or replaced.
    stamp: int = 0

    def to_fields(self) -> dict[str, str]:
        return {"epoch": str(self.epoch), "seq": str(self.seq), "stamp": str(self.stamp)}


class PartitionStore(Protocol):
    async def save(self, queue: str, partition: int, writes: Writes, position: Position,
                   state: PartitionState) -> None:
        """Persist one batch of applied ops atomically with the new position."""
        ...

    async def save_many(self, batch: Sequence[SaveItem]) -> None:
        """Several partitions' saves in one atomic transaction."""
        ...

    async def replace(self, queue: str, partition: int, state: PartitionState,
                      position: Position) -> None:
        """Replace the partition wholesale (a full state transfer)."""
        ...

    async def load(self, queue: str, partition: int) -> tuple[PartitionState, Position]: ...

    async def stored(self) -> list[tuple[str, int]]:
        """Every (queue, partition) this node holds."""
        ...


# (queue, partition, writes, position, state)
SaveItem = tuple[str, int, Writes, Position, PartitionState]


def base_key(queue: str, partition: int) -> str:
    return f"{PREFIX}{queue}:{partition}"


# --- memory ----------------------------------------------------------------------------


@dataclass
class MemoryPartitionStore:
    """Keeps exports of partitions; what `load` returns is what was saved, no more."""

    data: dict[tuple[str, int], tuple[dict[str, object], Position]] = field(default_factory=dict)

    async def save(self, queue: str, partition: int, writes: Writes, position: Position,
                   state: PartitionState) -> None:
        self.data[(queue, partition)] = (state.export(), position)

    async def save_many(self, batch: Sequence[SaveItem]) -> None:
        for queue, partition, writes, position, state in batch:
            await self.save(queue, partition, writes, position, state)

    async def replace(self, queue: str, partition: int, state: PartitionState,
                      position: Position) -> None:
        self.data[(queue, partition)] = (state.export(), position)

    async def load(self, queue: str, partition: int) -> tuple[PartitionState, Position]:
        saved = self.data.get((queue, partition))
        if saved is None:
            return PartitionState(), Position()
        return PartitionState.from_export(saved[0]), saved[1]

    async def stored(self) -> list[tuple[str, int]]:
        return sorted(self.data)


# --- Redis -----------------------------------------------------------------------------


class RedisPartitionStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = write_batch_script(redis)

    async def save(self, queue: str, partition: int, writes: Writes, position: Position,
                   state: PartitionState) -> None:
        await self.save_many([(queue, partition, writes, position, state)])

    async def save_many(self, batch: Sequence[SaveItem]) -> None:
        # A save may run twice: redis-py resends a command whose reply was lost, and the
        # replica retries a failed save with the same writes. All but the message XADDs
        # are idempotent (dead letters repeated are dropped on load), and those are sent
        # as "may exist": a message already stored is skipped.
        writes_batch = WriteBatch()
        for queue, partition, writes, position, state in batch:
            _queue_writes(writes_batch, base_key(queue, partition), writes)
            writes_batch.hset(base_key(queue, partition) + ":meta",
                              _meta_fields(position, state))
        await writes_batch.execute(self._script)

    async def replace(self, queue: str, partition: int, state: PartitionState,
                      position: Position) -> None:
        base = base_key(queue, partition)
        old = [k async for k in self._redis.scan_iter(match=_escape(base) + ":g:*", count=500)]
        batch = WriteBatch()
        for name in (base, base + ":ids", base + ":dead", base + ":meta", *old):
            batch.delete(name)
        full = Writes(
            messages=list(state.messages.values()),
            dead=list(state.dead),
            ids={i: o for i, o in state.ids.items()},
        )
        for name, g in state.groups.items():
            full.group_fields[(name, "next")] = str(g.next)
            for offset, p in g.pending.items():
                full.group_fields[(name, f"p:{offset}")] = pending_field(p)
            for offset in g.waiting:
                full.group_fields[(name, f"w:{offset}")] = "1"
        _queue_writes(batch, base, full)
        batch.hset(base + ":meta", _meta_fields(position, state))
        await batch.execute_as_transaction(self._redis)  # a whole partition: maybe GiBs

    async def load(self, queue: str, partition: int) -> tuple[PartitionState, Position]:
        base = base_key(queue, partition)
        meta = _text(await self._redis.hgetall(base + ":meta"))
        state = PartitionState()
        if not meta:
            return state, Position()
        state.end = int(meta.get("end", "0"))
        state.trimmed = int(meta.get("trimmed", "0"))
        first = f"{state.trimmed + 1}-0"  # earlier entries may outlive an approximate trim
        for entry_id, fields in _entries(await self._redis.xrange(base, first, "+")):
            f = _text(fields)
            offset = int(as_text(entry_id).split("-", 1)[0])
            state.messages[offset] = Message(offset, f["id"], f.get("key"), f["body"])
        ids = _text(await self._redis.hgetall(base + ":ids"))
        state.ids = dict(sorted(((i, int(o)) for i, o in ids.items()), key=lambda io: io[1]))
        async for raw_key in self._redis.scan_iter(match=_escape(base) + ":g:*", count=500):
            key = as_text(raw_key)
            name = key[len(base) + 3 :]
            group_fields = _text(await self._redis.hgetall(key))
            g = Group(int(group_fields.get("next", str(state.trimmed + 1))))
            for fname, value in group_fields.items():
                if fname.startswith("p:"):
                    g.pending[int(fname[2:])] = parse_pending_field(value)
                elif fname.startswith("w:"):
                    g.waiting.add(int(fname[2:]))
            state.groups[name] = g
        dead = await self._redis.xrevrange(base + ":dead", "+", "-", count=MAX_DEAD_KEPT)
        # A message dies at most once per group: a second entry is a repeated save's.
        seen: set[tuple[str, int]] = set()
        for _, fields in reversed(_entries(dead)):
            f = _text(fields)
            message = Message(int(f["offset"]), f["id"], f.get("key"), f["body"])
            if (f["group"], message.offset) not in seen:
                seen.add((f["group"], message.offset))
                state.dead.append(DeadLetter(f["group"], int(f["count"]), message))
        position = Position(
            int(meta.get("epoch", "0")), int(meta.get("seq", "0")),
            int(meta.get("stamp", "0")),
        )
        return state, position

    async def stored(self) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        async for raw_key in self._redis.scan_iter(match=PREFIX + "*:meta", count=500):
            key = as_text(raw_key)[len(PREFIX) : -len(":meta")]
            queue, _, partition = key.rpartition(":")
            if queue and partition.isdigit():
                found.append((queue, int(partition)))
        return sorted(found)


def _queue_writes(batch: WriteBatch, base: str, writes: Writes) -> None:
    for m in writes.messages:
        fields = {"id": m.id, "body": m.body}
        if m.key is not None:
            fields["key"] = m.key
        batch.xadd(base, fields, f"{m.offset}-0", may_exist=True)
    if writes.trim_upto is not None:
        # Exact (not `~`): an approximate trim drops only whole stream nodes, leaving
        # trimmed messages that a load would bring back.
        batch.xtrim_minid(base, f"{writes.trim_upto + 1}-0")
    for letter in writes.dead:
        m = letter.message
        dead = {"group": letter.group, "count": str(letter.count), "offset": str(m.offset),
                "id": m.id, "body": m.body}
        if m.key is not None:
            dead["key"] = m.key
        batch.xadd(base + ":dead", dead, maxlen=MAX_DEAD_KEPT)
    groups: dict[str, tuple[dict[str, str], list[str]]] = {}
    for (group, fname), value in writes.group_fields.items():
        sets, dels = groups.setdefault(group, ({}, []))
        if value is None:
            dels.append(fname)
        else:
            sets[fname] = value
    for group, (sets, dels) in groups.items():
        key = f"{base}:g:{group}"
        batch.hdel(key, dels)
        batch.hset(key, sets)
    batch.hdel(base + ":ids", [i for i, o in writes.ids.items() if o is None])
    batch.hset(base + ":ids", {i: str(o) for i, o in writes.ids.items() if o is not None})


def _meta_fields(position: Position, state: PartitionState) -> dict[str, str]:
    fields: dict[str, str] = {"end": str(state.end), "trimmed": str(state.trimmed)}
    fields.update(position.to_fields())
    return fields


def _entries(raw: Any) -> list[tuple[bytes | str, Mapping[bytes | str, bytes | str]]]:
    # redis-py types stream replies loosely; a missing stream reads as no entries.
    return list(raw or [])


def _text(fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in fields.items()}


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
