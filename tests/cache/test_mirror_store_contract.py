"""One contract for the stores that keep the peers' cache mirrors: in-memory, fakeredis
and a real redis-server. Each test reads back through a reopened store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from service.cache.messages import PersistEntry, PersistLine
from service.cache.mirror_store import (
    MIRROR_PREFIX,
    Applied,
    MemoryMirrorStore,
    MirrorStore,
    MirrorUpdate,
    RedisMirrorStore,
    fields_of,
    image_of,
    stored_of,
)
from service.cache.store import StoredCache
from service.storage.embedded import EmbeddedRedis
from tests.helpers.redis_server import fresh_redis, redis_connector

LINE = {"state": "M", "version": "3", "txn": "7", "value": '{"a":1}'}
ENTRY = {"state": "S", "owner": "", "sharers": '{"n2":4}', "version": "2", "txn": "4"}


@dataclass
class Backend:
    store: MirrorStore
    reopen: Callable[[], Awaitable[None]]
    redis: Redis | None = None


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def backend(
    request: pytest.FixtureRequest, real_redis: EmbeddedRedis
) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield Backend(MemoryMirrorStore(), _noop)  # the same object is the reopened store
        return
    async with fresh_redis(redis_connector(request.param, real_redis)) as handle:
        opened = Backend(RedisMirrorStore(handle.client), _noop, handle.client)

        async def reopen() -> None:
            opened.redis = await handle.reopen()
            opened.store = RedisMirrorStore(opened.redis)

        opened.reopen = reopen
        yield opened


async def _noop() -> None:
    return None


def image(position: tuple[int, int], **writes: str) -> MirrorUpdate:
    return MirrorUpdate(position, writes)


async def test_no_mirror_is_none(backend: Backend) -> None:
    assert await backend.store.image("n1") is None


async def test_a_full_image_round_trips(backend: Backend) -> None:
    stored = StoredCache({"k": LINE, "odd key *": LINE}, {"k": ENTRY})
    update = MirrorUpdate((1, 0), image_of(stored))
    assert await backend.store.apply("n1", update) == Applied(True, (1, 0))
    await backend.reopen()
    held = await backend.store.image("n1")
    assert held is not None and held.position == (1, 0)
    assert stored_of(held.writes) == stored


async def test_updates_apply_only_on_their_base(backend: Backend) -> None:
    s = backend.store
    await s.apply("n1", image((2, 0), a="1"))
    first = MirrorUpdate((2, 3), {"b": "2"}, base=(2, 0))
    assert await s.apply("n1", first) == Applied(True, (2, 3))
    # A gap (the mirror missed 2:4) and a replay of an old update are both refused.
    assert await s.apply("n1", MirrorUpdate((2, 6), {"c": "3"}, base=(2, 4))) == Applied(
        False, (2, 3)
    )
    assert await s.apply("n1", first) == Applied(False, (2, 3))
    await backend.reopen()
    held = await backend.store.image("n1")
    assert held is not None and held.position == (2, 3)
    assert dict(held.writes) == {"a": "1", "b": "2"}


async def test_an_update_without_a_mirror_is_refused(backend: Backend) -> None:
    update = MirrorUpdate((1, 2), {"a": "1"}, base=(1, 1))
    assert await backend.store.apply("n1", update) == Applied(False, None)
    assert await backend.store.image("n1") is None


async def test_deletes_remove_fields(backend: Backend) -> None:
    await backend.store.apply("n1", image((1, 0), a="1", b="2"))
    await backend.store.apply("n1", MirrorUpdate((1, 1), {"a": None, "c": "3"}, base=(1, 0)))
    await backend.reopen()
    held = await backend.store.image("n1")
    assert held is not None and dict(held.writes) == {"b": "2", "c": "3"}


async def test_a_full_image_replaces_everything_but_never_goes_back(backend: Backend) -> None:
    s = backend.store
    await s.apply("n1", image((1, 5), a="1", b="2"))
    assert await s.apply("n1", image((1, 4), old="x")) == Applied(False, (1, 5))
    assert await s.apply("n1", image((2, 0), c="3")) == Applied(True, (2, 0))
    await backend.reopen()
    held = await backend.store.image("n1")
    assert held is not None and held.position == (2, 0) and dict(held.writes) == {"c": "3"}


async def test_sources_are_kept_apart(backend: Backend) -> None:
    await backend.store.apply("n1", image((1, 0), a="1"))
    await backend.store.apply("n2", image((7, 0), a="2"))
    one, two = await backend.store.image("n1"), await backend.store.image("n2")
    assert one is not None and two is not None
    assert (one.position, dict(one.writes)) == ((1, 0), {"a": "1"})
    assert (two.position, dict(two.writes)) == ((7, 0), {"a": "2"})


async def test_redis_layout_is_one_readable_hash_per_source(backend: Backend) -> None:
    if backend.redis is None:
        pytest.skip("Redis layout only")
    writes = fields_of([PersistLine("n1", "k", LINE), PersistEntry("k", ENTRY)])
    await backend.store.apply("n1", MirrorUpdate((3, 9), writes))
    raw = await backend.redis.hgetall(f"{MIRROR_PREFIX}n1")
    assert MIRROR_PREFIX == "dsync:cache:mirror:"
    assert raw[b"@position"] == b"3:9"
    assert set(raw) == {b"@position", b"L:k", b"D:k"}


def test_the_last_write_of_a_hash_in_a_batch_wins() -> None:
    writes = fields_of([PersistLine("n1", "k", LINE), PersistLine("n1", "k", None)])
    assert writes == {"L:k": None}


def test_a_retired_entry_and_the_floor_travel_to_the_mirror_and_back() -> None:
    floor = {"txn": "4", "version": "2"}
    writes = fields_of([PersistEntry("", floor), PersistEntry("k", None)])
    assert writes == {"D:": '{"txn":"4","version":"2"}', "D:k": None}
    held = {name: raw for name, raw in writes.items() if raw is not None}
    assert stored_of(held).entries == {"": floor}


async def test_concurrent_copies_of_one_update_apply_once(backend: Backend) -> None:
    await backend.store.apply("n1", image((1, 0), a="1"))
    update = MirrorUpdate((1, 1), {"b": "2"}, base=(1, 0))
    results = await asyncio.gather(*(backend.store.apply("n1", update) for _ in range(5)))
    assert sum(r.applied for r in results) == 1
    assert all(r.position == (1, 1) for r in results)


def part(position: tuple[int, int], index: int, last: bool, **writes: str) -> MirrorUpdate:
    return MirrorUpdate(position, writes, None, index, last)


async def test_an_image_in_parts_replaces_the_mirror_only_with_its_last_part(
    backend: Backend,
) -> None:
    s = backend.store
    await s.apply("n1", image((1, 4), old="1"))
    assert await s.apply("n1", part((2, 0), 0, False, a="1")) == Applied(True, (1, 4))
    assert await s.apply("n1", part((2, 0), 1, False, b="2")) == Applied(True, (1, 4))
    held = await s.image("n1")
    assert held is not None and (held.position, dict(held.writes)) == ((1, 4), {"old": "1"})
    assert await s.apply("n1", part((2, 0), 2, True, c="3")) == Applied(True, (2, 0))
    await backend.reopen()
    held = await backend.store.image("n1")
    assert held is not None and held.position == (2, 0)
    assert dict(held.writes) == {"a": "1", "b": "2", "c": "3"}
    if backend.redis is not None:  # the staging copy became the mirror: nothing is left
        assert await backend.redis.exists("dsync:cache:mirror-staging:n1") == 0


async def test_an_image_with_a_missing_part_is_refused_until_it_starts_over(
    backend: Backend,
) -> None:
    s = backend.store
    await s.apply("n1", image((1, 4), old="1"))
    await s.apply("n1", part((2, 0), 0, False, a="1"))
    assert await s.apply("n1", part((2, 0), 2, True, c="3")) == Applied(False, (1, 4))
    assert await s.apply("n1", part((2, 1), 1, True, c="3")) == Applied(False, (1, 4))
    held = await s.image("n1")
    assert held is not None and held.position == (1, 4)
    await s.apply("n1", part((2, 1), 0, False, a="1"))  # a new image from the start
    assert await s.apply("n1", part((2, 1), 1, True, c="3")) == Applied(True, (2, 1))
    held = await s.image("n1")
    assert held is not None and dict(held.writes) == {"a": "1", "c": "3"}


async def test_an_older_image_does_not_even_start(backend: Backend) -> None:
    await backend.store.apply("n1", image((3, 0), a="1"))
    assert await backend.store.apply("n1", part((2, 9), 0, False, b="2")) == Applied(
        False, (3, 0)
    )
