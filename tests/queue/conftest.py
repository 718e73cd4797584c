"""Partition stores on memory, fakeredis and a real redis-server (one per session, the
same `shared_redis` the storage contract uses; each test flushes it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from service.queue.store import MemoryPartitionStore, PartitionStore, RedisPartitionStore
from service.storage.embedded import EmbeddedRedis
from tests.helpers.redis_server import fresh_redis, redis_connector
from tests.storage.conftest import shared_redis

__all__ = ["StoreBackend", "shared_redis"]


@dataclass
class StoreBackend:
    name: str
    store: PartitionStore
    # Replaces `store` with a fresh object (and connection) over what was stored, as a
    # restarted node would see it.
    reopen: Callable[[], Awaitable[None]]
    connect: Callable[[], Redis] | None = None
    redis: Redis | None = None


async def _noop() -> None:
    return None


@asynccontextmanager
async def _memory() -> AsyncIterator[StoreBackend]:
    backend = StoreBackend("memory", MemoryPartitionStore(), _noop)

    async def reopen() -> None:
        assert isinstance(backend.store, MemoryPartitionStore)
        backend.store = MemoryPartitionStore(data=backend.store.data)

    backend.reopen = reopen
    yield backend


@asynccontextmanager
async def _redis(name: str, connect: Callable[[], Redis]) -> AsyncIterator[StoreBackend]:
    async with fresh_redis(connect) as handle:
        client = handle.client
        backend = StoreBackend(name, RedisPartitionStore(client), _noop, connect, client)

        async def reopen() -> None:
            backend.redis = await handle.reopen()
            backend.store = RedisPartitionStore(backend.redis)

        backend.reopen = reopen
        yield backend


def _open(kind: str, real: EmbeddedRedis) -> AbstractAsyncContextManager[StoreBackend]:
    if kind == "memory":
        return _memory()
    return _redis(kind, redis_connector(kind, real))


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def store_backend(
    request: pytest.FixtureRequest, shared_redis: EmbeddedRedis
) -> AsyncIterator[StoreBackend]:
    async with _open(request.param, shared_redis) as opened:
        yield opened


@pytest.fixture(params=["fakeredis", "redis"])
async def redis_store_backend(
    request: pytest.FixtureRequest, shared_redis: EmbeddedRedis
) -> AsyncIterator[StoreBackend]:
    async with _open(request.param, shared_redis) as opened:
        yield opened
