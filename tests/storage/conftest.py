from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from service.storage.embedded import EmbeddedRedis
from service.storage.memory import InMemoryRaftStorage, InMemoryStateStore
from service.storage.protocols import RaftStorage, StateStore
from service.storage.redis_store import RedisRaftStorage, RedisStateStore
from tests.helpers.redis_server import fresh_redis, redis_connector, redis_server


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real redis-server for the whole session; tests flush it before use."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@dataclass
class Backend:
    name: str
    raft: RaftStorage
    state: StateStore
    # Replaces raft and state with fresh objects over only what was durably stored,
    # as a restarted node would see it.
    reopen: Callable[[], Awaitable[None]]
    redis: Redis | None = None


@asynccontextmanager
async def _memory_backend() -> AsyncIterator[Backend]:
    raft, state = InMemoryRaftStorage(), InMemoryStateStore()
    backend = Backend("memory", raft, state, _noop)

    async def reopen() -> None:
        assert isinstance(backend.raft, InMemoryRaftStorage)
        assert isinstance(backend.state, InMemoryStateStore)
        backend.raft, backend.state = backend.raft.crash(), backend.state.crash()

    backend.reopen = reopen
    yield backend


async def _noop() -> None:
    return None


@asynccontextmanager
async def _redis_backend(name: str, connect: Callable[[], Redis]) -> AsyncIterator[Backend]:
    async with fresh_redis(connect) as handle:
        client = handle.client
        backend = Backend(name, RedisRaftStorage(client), RedisStateStore(client), _noop, client)

        async def reopen() -> None:
            backend.redis = await handle.reopen()
            backend.raft = RedisRaftStorage(backend.redis)
            backend.state = RedisStateStore(backend.redis)

        backend.reopen = reopen
        yield backend


def _open(kind: str, real: EmbeddedRedis) -> AbstractAsyncContextManager[Backend]:
    if kind == "memory":
        return _memory_backend()
    return _redis_backend(kind, redis_connector(kind, real))


# shared_redis is a direct dependency (not requested lazily) so the sync session fixture
# starts before any event loop runs.
@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def backend(
    request: pytest.FixtureRequest, shared_redis: EmbeddedRedis
) -> AsyncIterator[Backend]:
    async with _open(request.param, shared_redis) as opened:
        yield opened


@pytest.fixture(params=["fakeredis", "redis"])
async def redis_backend(
    request: pytest.FixtureRequest, shared_redis: EmbeddedRedis
) -> AsyncIterator[Backend]:
    """Redis implementations only, for behaviour that has no in-memory counterpart."""
    async with _open(request.param, shared_redis) as opened:
        yield opened
