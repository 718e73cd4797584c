"""One contract for every cache store: in-memory, fakeredis and a real redis-server.

Each test checks what a *restarted* node would load (the store is reopened over only what
was durably written), not what an object remembers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from service.cache.messages import PersistEntry, PersistLine
from service.cache.store import (
    DIR_PREFIX,
    INCARNATION_KEY,
    LINE_PREFIX,
    LocalCacheStore,
    MemoryCacheStore,
    RedisCacheStore,
    StoredCache,
)
from service.storage.embedded import EmbeddedRedis
from tests.helpers.redis_server import (
    fresh_redis,
    redis_connector,
    running_redis,
    wait_gone,
)
from tests.helpers.redis_spy import redis_calls

NODE = "n1"
M_LINE = {"state": "M", "version": "3", "txn": "7", "value": '{"a":1}'}
I_LINE = {"state": "I", "version": "3", "txn": "8"}
ENTRY = {"state": "S", "owner": "", "owner_txn": "0", "sharers": '{"n2":4}', "version": "2",
         "txn": "4", "value": '"x"'}  # fmt: skip


@dataclass
class Backend:
    name: str
    store: LocalCacheStore
    reopen: Callable[[], Awaitable[None]]
    redis: Redis | None = None


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def backend(
    request: pytest.FixtureRequest, real_redis: EmbeddedRedis
) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = MemoryCacheStore()
        opened = Backend("memory", memory, _noop)

        async def reopen_memory() -> None:
            assert isinstance(opened.store, MemoryCacheStore)
            opened.store = opened.store.crash()

        opened.reopen = reopen_memory
        yield opened
        return
    async with fresh_redis(redis_connector(request.param, real_redis)) as handle:
        client = handle.client
        opened = Backend(request.param, RedisCacheStore(client), _noop, client)

        async def reopen_redis() -> None:
            opened.redis = await handle.reopen()
            opened.store = RedisCacheStore(opened.redis)

        opened.reopen = reopen_redis
        yield opened


async def _noop() -> None:
    return None


async def test_an_empty_store_loads_nothing(backend: Backend) -> None:
    stored = await backend.store.load()
    assert stored.lines == {} and stored.entries == {}


async def test_incarnations_count_up_across_restarts(backend: Backend) -> None:
    assert await backend.store.next_incarnation() == 1
    assert await backend.store.next_incarnation() == 2
    await backend.reopen()
    assert await backend.store.next_incarnation() == 3


async def test_lines_and_entries_round_trip(backend: Backend) -> None:
    await backend.store.persist(
        [PersistLine(NODE, "k", M_LINE), PersistEntry("k", ENTRY), PersistLine(NODE, "j", I_LINE)]
    )
    await backend.reopen()
    stored = await backend.store.load()
    assert stored.lines == {"k": M_LINE, "j": I_LINE}
    assert stored.entries == {"k": ENTRY}


async def test_a_rewrite_replaces_the_whole_hash(backend: Backend) -> None:
    await backend.store.persist([PersistLine(NODE, "k", M_LINE)])
    await backend.store.persist([PersistLine(NODE, "k", I_LINE)])  # no "value" any more
    await backend.reopen()
    assert (await backend.store.load()).lines == {"k": I_LINE}


async def test_none_fields_delete_a_line(backend: Backend) -> None:
    await backend.store.persist([PersistLine(NODE, "k", M_LINE), PersistLine(NODE, "j", I_LINE)])
    await backend.store.persist([PersistLine(NODE, "k", None)])
    await backend.reopen()
    assert (await backend.store.load()).lines == {"j": I_LINE}


async def test_a_retired_entry_is_deleted_with_the_floor_written_in_the_same_batch(
    backend: Backend,
) -> None:
    floor = {"txn": "4", "version": "2"}
    await backend.store.persist([PersistEntry("k", ENTRY), PersistEntry("j", ENTRY)])
    await backend.store.persist([PersistEntry("", floor), PersistEntry("k", None)])
    await backend.reopen()
    assert (await backend.store.load()).entries == {"": floor, "j": ENTRY}
    if backend.redis is not None:  # what redis-cli shows
        assert await backend.redis.hgetall(DIR_PREFIX) == {b"txn": b"4", b"version": b"2"}


async def test_the_last_write_of_a_key_in_a_batch_wins(backend: Backend) -> None:
    await backend.store.persist(
        [
            PersistLine(NODE, "k", M_LINE),
            PersistLine(NODE, "k", None),
            PersistLine(NODE, "k", I_LINE),
            PersistEntry("k", ENTRY),
            PersistEntry("k", {**ENTRY, "txn": "5"}),
        ]
    )
    await backend.reopen()
    stored = await backend.store.load()
    assert stored.lines == {"k": I_LINE} and stored.entries["k"]["txn"] == "5"


async def test_lines_and_entries_of_one_key_are_independent(backend: Backend) -> None:
    await backend.store.persist([PersistLine(NODE, "k", M_LINE), PersistEntry("k", ENTRY)])
    await backend.store.persist([PersistLine(NODE, "k", None)])
    await backend.reopen()
    stored = await backend.store.load()
    assert stored.lines == {} and stored.entries == {"k": ENTRY}


@pytest.mark.parametrize(
    "key",
    ["*", "a?b", "[x]", "with space", "dsync:cache:line:nested", "ключ-🔑", "k" * 512, "a\\b"],
)
async def test_any_key_round_trips(backend: Backend, key: str) -> None:
    await backend.store.persist([PersistLine(NODE, key, M_LINE), PersistEntry(key, ENTRY)])
    await backend.store.persist([PersistLine(NODE, "other", I_LINE)])
    await backend.reopen()
    stored = await backend.store.load()
    assert stored.lines == {key: M_LINE, "other": I_LINE}
    assert stored.entries == {key: ENTRY}


async def test_many_keys_are_all_loaded(backend: Backend) -> None:
    writes = [PersistLine(NODE, f"key-{i}", {**I_LINE, "txn": str(i)}) for i in range(2_345)]
    await backend.store.persist(writes)
    await backend.reopen()
    lines = (await backend.store.load()).lines
    assert len(lines) == 2_345 and lines["key-2000"]["txn"] == "2000"


async def test_redis_layout_is_what_the_readme_documents(backend: Backend) -> None:
    if backend.redis is None:
        pytest.skip("Redis layout only")
    r = backend.redis
    await backend.store.persist([PersistLine(NODE, "k", M_LINE), PersistEntry("k", ENTRY)])
    await backend.store.next_incarnation()
    assert await r.hgetall(f"{LINE_PREFIX}k") == {f.encode(): v.encode() for f, v in M_LINE.items()}
    assert await r.hgetall(f"{DIR_PREFIX}k") == {f.encode(): v.encode() for f, v in ENTRY.items()}
    assert LINE_PREFIX == "dsync:cache:line:" and DIR_PREFIX == "dsync:cache:dir:"
    assert await r.get(INCARNATION_KEY) == b"1"


async def test_foreign_keys_are_ignored(backend: Backend) -> None:
    if backend.redis is None:
        pytest.skip("Redis only")
    r = backend.redis
    await r.hset("dsync:lock:k", mapping={"mode": "exclusive"})
    await r.set(f"{LINE_PREFIX}not-a-hash", "oops")
    await backend.store.persist([PersistLine(NODE, "k", M_LINE)])
    stored = await backend.store.load()
    assert stored.lines == {"k": M_LINE} and stored.entries == {}
    assert await r.hgetall("dsync:lock:k") == {b"mode": b"exclusive"}


async def test_a_persist_is_one_command(backend: Backend) -> None:
    """50 hashes replaced in one atomic script call: no pipeline, one EVALSHA."""
    if backend.redis is None:
        pytest.skip("Redis only")
    redis = backend.redis
    await backend.store.persist([PersistLine(NODE, "warm", M_LINE)])  # loads the script
    with redis_calls(redis) as calls:
        await backend.store.persist(
            [PersistLine(NODE, f"k{i}", M_LINE) for i in range(50)]
            + [PersistLine(NODE, "warm", None)]
        )
    assert calls.pipelines == [] and calls.commands == ["EVALSHA"]
    await backend.reopen()
    stored = await backend.store.load()
    assert stored.lines == {f"k{i}": M_LINE for i in range(50)}


async def test_persisted_state_survives_kill_9_of_redis(tmp_path: Path) -> None:
    async with running_redis(tmp_path) as server:
        client = Redis.from_url(server.url)
        store = RedisCacheStore(client)
        await store.persist([PersistLine(NODE, "k", M_LINE), PersistEntry("k", ENTRY)])
        assert await store.next_incarnation() == 1
        await client.aclose()
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        await server.start()  # same data dir and port: only the AOF remains
        client = Redis.from_url(server.url)
        store = RedisCacheStore(client)
        stored = await store.load()
        assert stored.lines == {"k": M_LINE} and stored.entries == {"k": ENTRY}
        assert await store.next_incarnation() == 2
        await client.aclose()


async def test_incarnation_reads_without_counting(backend: Backend) -> None:
    assert await backend.store.incarnation() == 0  # never started
    await backend.store.next_incarnation()
    await backend.reopen()
    assert await backend.store.incarnation() == 1
    assert await backend.store.incarnation() == 1


async def test_restore_writes_everything_and_the_incarnation(backend: Backend) -> None:
    stored = StoredCache({"k": M_LINE, "j": I_LINE}, {"k": ENTRY})
    await backend.store.restore(stored, 41)
    await backend.reopen()
    assert await backend.store.load() == stored
    assert await backend.store.next_incarnation() == 42
