"""The copies a node keeps of its peers' cache stores, so a lost disk loses no write.

A node's cache store (store.py) holds its lines (an M line is a write nobody else has
yet) and the directory entries and backing values it homes. kill -9 loses none of it
(AOF, fsync always), but the loss of the disk would. So every node sends each persist to
its peers too (mirrored.py), and acknowledges nothing a persist guards until at least
one peer holds it; a node that restarts with an empty store takes back the newest copy.

A mirror is kept per source node and moves in steps: an *update* applies only on top of
the exact position it was computed from (`base`), so a mirror that missed one (its peer
was down, a reply was lost) refuses the next and is sent a *full image* instead. A full
image is applied unless the mirror already holds a newer position (a late, slow image
must not move a mirror back). Positions are (incarnation, sequence) of the source node:
its incarnation grows at every start, its sequence at every persist.

A full image travels in parts of a few MiB (a node's store can hold far more than one
request should); the parts build a staging copy, and the last one replaces the mirror
with it in one step, so a mirror is never half old, half new.

Redis layout (readable with redis-cli):

    dsync:cache:mirror:<node>   hash  "@position" -> "<incarnation>:<sequence>";
                                      "L:<key>" -> that node's line hash of <key>, as JSON;
                                      "D:<key>" -> the directory entry it homes, as JSON
    dsync:cache:mirror-staging:<node>  hash  a full image being received: the same
                                      fields, plus "@part" (the last part received)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from service.cache.messages import PersistEntry
from service.cache.store import Persist, StoredCache
from service.storage.codec import as_text
from service.storage.write_batch import WriteBatch, write_batch_script

MIRROR_PREFIX = "dsync:cache:mirror:"
STAGING_PREFIX = "dsync:cache:mirror-staging:"
POSITION_FIELD = "@position"
PART_FIELD = "@part"
LINE_TAG = "L:"
ENTRY_TAG = "D:"

Position = tuple[int, int]  # (incarnation, sequence) of the source node


@dataclass(frozen=True, slots=True)
class MirrorUpdate:
    """Hash fields to set (JSON) or delete (None), and the position they lead to.

    `base` None makes it (part `part` of) a full image: once its `last` part is in, the
    mirror becomes exactly the writes of all its parts."""

    position: Position
    writes: Mapping[str, str | None]
    base: Position | None = None
    part: int = 0
    last: bool = True

    @property
    def full(self) -> bool:
        return self.base is None


@dataclass(frozen=True, slots=True)
class MirrorImage:
    position: Position
    writes: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Applied:
    """What a mirror answered: whether it applied the update, and where it stands now."""

    applied: bool
    position: Position | None


class MirrorStore(Protocol):
    async def apply(self, source: str, update: MirrorUpdate) -> Applied:
        """Apply the update to the mirror of `source` atomically and durably if it fits."""
        ...

    async def image(self, source: str) -> MirrorImage | None:
        """The mirror of `source`; None if this node never held one."""
        ...


def fits(update: MirrorUpdate, current: Position | None) -> bool:
    if update.base is None:
        return current is None or update.position >= current
    return current == update.base


# --- fields ----------------------------------------------------------------------------


def fields_of(writes: Sequence[Persist]) -> dict[str, str | None]:
    """The mirror fields of a persist batch (the last write of each hash wins)."""
    out: dict[str, str | None] = {}
    for write in writes:
        tag = ENTRY_TAG if isinstance(write, PersistEntry) else LINE_TAG
        out[tag + write.key] = None if write.fields is None else _dump(write.fields)
    return out


def image_of(stored: StoredCache) -> dict[str, str]:
    out = {LINE_TAG + key: _dump(fields) for key, fields in stored.lines.items()}
    out.update((ENTRY_TAG + key, _dump(fields)) for key, fields in stored.entries.items())
    return out


def stored_of(writes: Mapping[str, str]) -> StoredCache:
    """Back from mirror fields to what the source's own store would load."""
    stored = StoredCache()
    for name, raw in writes.items():
        if name.startswith(LINE_TAG):
            stored.lines[name[len(LINE_TAG) :]] = _load(raw)
        elif name.startswith(ENTRY_TAG):
            stored.entries[name[len(ENTRY_TAG) :]] = _load(raw)
    return stored


def encode_position(position: Position) -> str:
    return f"{position[0]}:{position[1]}"


def decode_position(raw: str | bytes | None) -> Position | None:
    if raw is None:
        return None
    incarnation, _, sequence = as_text(raw).partition(":")
    return int(incarnation), int(sequence)


def _dump(fields: Mapping[str, str]) -> str:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True)


def _load(raw: str) -> dict[str, str]:
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"not a mirrored hash: {raw[:80]!r}")
    return value


# --- memory ----------------------------------------------------------------------------


@dataclass
class MemoryMirrorStore:
    mirrors: dict[str, tuple[Position, dict[str, str]]] = field(default_factory=dict)
    # source -> (position, last part received, fields) of a full image coming in
    staging: dict[str, tuple[Position, int, dict[str, str]]] = field(default_factory=dict)

    async def apply(self, source: str, update: MirrorUpdate) -> Applied:
        held = self.mirrors.get(source)
        current = held[0] if held else None
        if update.full:
            return self._apply_part(source, update, current)
        if not fits(update, current) or held is None:
            return Applied(False, current)
        fields = dict(held[1])
        for name, value in update.writes.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        self.mirrors[source] = (update.position, fields)
        return Applied(True, update.position)

    def _apply_part(self, source: str, update: MirrorUpdate, current: Position | None) -> Applied:
        if update.part == 0:
            if not fits(update, current):
                return Applied(False, current)
            fields: dict[str, str] = {}
        else:
            staged = self.staging.get(source)
            if staged is None or staged[:2] != (update.position, update.part - 1):
                return Applied(False, current)  # a part went missing: start over
            fields = staged[2]
        fields.update((k, v) for k, v in update.writes.items() if v is not None)
        if not update.last:
            self.staging[source] = (update.position, update.part, fields)
            return Applied(True, current)
        self.staging.pop(source, None)
        self.mirrors[source] = (update.position, fields)
        return Applied(True, update.position)

    async def image(self, source: str) -> MirrorImage | None:
        held = self.mirrors.get(source)
        return None if held is None else MirrorImage(held[0], dict(held[1]))


# --- Redis -----------------------------------------------------------------------------


class RedisMirrorStore:
    """Only this node writes the mirrors in its Redis, so "check the position, then
    write" is made one step by a lock per source in this process, and the position is
    remembered: an update is one script call (no WATCH, no read)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = write_batch_script(redis)
        self._locks: dict[str, asyncio.Lock] = {}
        self._positions: dict[str, Position | None] = {}  # as last read or written

    async def apply(self, source: str, update: MirrorUpdate) -> Applied:
        name = MIRROR_PREFIX + source
        async with self._locks.setdefault(source, asyncio.Lock()):
            if source in self._positions:
                current = self._positions[source]
            else:
                current = decode_position(await self._redis.hget(name, POSITION_FIELD))
                self._positions[source] = current
            if update.full:
                return await self._apply_part(source, update, current)
            if not fits(update, current):
                return Applied(False, current)
            sets = {k: v for k, v in update.writes.items() if v is not None}
            sets[POSITION_FIELD] = encode_position(update.position)
            deletes = [k for k, v in update.writes.items() if v is None]
            # Whatever happens to the script call, the position is read again next time.
            del self._positions[source]
            batch = WriteBatch()
            batch.hdel(name, deletes)
            batch.hset(name, sets)
            await batch.execute(self._script)
            self._positions[source] = update.position
            return Applied(True, update.position)

    async def _apply_part(
        self, source: str, update: MirrorUpdate, current: Position | None
    ) -> Applied:
        name, staging = MIRROR_PREFIX + source, STAGING_PREFIX + source
        if update.part == 0:
            if not fits(update, current):
                return Applied(False, current)
        else:
            at, part = await self._redis.hmget(staging, [POSITION_FIELD, PART_FIELD])
            if decode_position(at) != update.position or part is None or (
                int(part) != update.part - 1
            ):
                return Applied(False, current)  # a part went missing: start over
        sets = {k: v for k, v in update.writes.items() if v is not None}
        sets[POSITION_FIELD] = encode_position(update.position)
        sets[PART_FIELD] = str(update.part)
        del self._positions[source]
        async with self._redis.pipeline(transaction=True) as pipe:
            if update.part == 0:
                pipe.delete(staging)
            pipe.hset(staging, mapping=sets)  # type: ignore[arg-type]
            if update.last:
                pipe.hdel(staging, PART_FIELD)
                pipe.rename(staging, name)  # the whole image at once
            await pipe.execute()
        if not update.last:
            self._positions[source] = current
            return Applied(True, current)
        self._positions[source] = update.position
        return Applied(True, update.position)

    async def image(self, source: str) -> MirrorImage | None:
        raw = await self._redis.hgetall(MIRROR_PREFIX + source)
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        position = decode_position(fields.pop(POSITION_FIELD, None))
        return None if position is None else MirrorImage(position, fields)


__all__ = [
    "MIRROR_PREFIX",
    "Applied",
    "MemoryMirrorStore",
    "MirrorImage",
    "MirrorStore",
    "MirrorUpdate",
    "Position",
    "RedisMirrorStore",
    "fields_of",
    "image_of",
    "stored_of",
]
