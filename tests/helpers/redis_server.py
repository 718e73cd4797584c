"""Real redis-server processes for tests, started through the node's own EmbeddedRedis.

Usable from sync code (session fixtures, process-level tests) because the server process
is not tied to an event loop: each call runs on a private loop and leaves the test's loop
alone.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import fakeredis
from redis.asyncio import Redis

from service.storage.client import redis_client
from service.storage.embedded import EmbeddedRedis

T = TypeVar("T")


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on a private loop. From async code, await EmbeddedRedis directly instead:
    a worker thread would not do, since the server dies with the thread that started it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise RuntimeError("helpers.redis_server sync calls cannot run inside an event loop")
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def start_redis(data_dir: Path, port: int | None = None, **options: Any) -> EmbeddedRedis:
    server = EmbeddedRedis(data_dir, port if port is not None else free_port(), **options)
    run_sync(server.start())
    return server


def stop_redis(server: EmbeddedRedis) -> None:
    run_sync(server.stop())


@contextmanager
def redis_server(
    data_dir: Path, port: int | None = None, **options: Any
) -> Iterator[EmbeddedRedis]:
    server = start_redis(data_dir, port, **options)
    try:
        yield server
    finally:
        stop_redis(server)


@asynccontextmanager
async def running_redis(
    data_dir: Path, port: int | None = None, **options: Any
) -> AsyncIterator[EmbeddedRedis]:
    """The async counterpart of redis_server, for use inside async tests."""
    server = EmbeddedRedis(data_dir, port if port is not None else free_port(), **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def process_gone(pid: int) -> bool:
    """True once pid has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def redis_connector(kind: str, real: EmbeddedRedis) -> Callable[[], Redis]:
    """How a contract suite opens (and re-opens, as a restarted node would) the Redis it
    runs on: "fakeredis" (one in-process server shared by every connection) or "redis"
    (the real server)."""
    if kind == "fakeredis":
        server = fakeredis.FakeServer()
        return lambda: fakeredis.FakeAsyncRedis(server=server)
    if kind == "redis":
        return lambda: redis_client(real.url)  # the node's own client
    raise ValueError(f"no Redis of kind {kind!r}")


class RedisHandle:
    """One client of a contract suite's Redis, replaceable as a restarted node's would be."""

    def __init__(self, connect: Callable[[], Redis]) -> None:
        self._connect = connect
        self.client = connect()

    async def reopen(self) -> Redis:
        """A new connection: nothing may be remembered by the old objects or socket."""
        await self.client.aclose()
        self.client = self._connect()
        return self.client


@asynccontextmanager
async def fresh_redis(connect: Callable[[], Redis]) -> AsyncIterator[RedisHandle]:
    """A flushed Redis for one test, its current client closed at the end."""
    handle = RedisHandle(connect)
    await handle.client.flushall()
    try:
        yield handle
    finally:
        await handle.client.aclose()
