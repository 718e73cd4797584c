"""The node's Redis client packs commands in C: the bytes must be redis-py's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.typing import EncodableT

from service.storage.client import CONNECTION_CLASS, HiredisPackingConnection, redis_client
from tests.helpers.redis_server import running_redis

COMMANDS: list[tuple[EncodableT, ...]] = [
    ("SET", "dsync:state:applied_index", 12345),
    ("HSET", "dsync:lock:näme", "holder:o-1", "exclusive:7:30000", "last_token", "7"),
    ("ZADD", b"dsync:raft:log", b"3:1:normal:\x00\xff\r\n", 3),
    ("ZREMRANGEBYSCORE", "dsync:raft:log", 4, "+inf"),
    ("DEL", "k" * 10_000),  # longer than redis-py's buffer cutoff
    ("CONFIG GET", "appendfsync"),  # a command name of two words is split
    ("HSET", "h", "f", memoryview(b"view")),
]


def test_the_node_uses_the_hiredis_packing_connection() -> None:
    assert CONNECTION_CLASS is HiredisPackingConnection


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_packs_the_same_bytes_as_redis_py(command: tuple[EncodableT, ...]) -> None:
    ours = b"".join(HiredisPackingConnection().pack_command(*command))
    theirs = b"".join(bytes(part) for part in Connection().pack_command(*command))
    assert ours == theirs


def test_only_plain_tcp_urls_get_the_packing_connection() -> None:
    def connection_class(url: str) -> type:
        return type(redis_client(url).connection_pool.make_connection())

    assert connection_class("redis://127.0.0.1:1/0") is HiredisPackingConnection
    assert connection_class("rediss://127.0.0.1:1/0") is SSLConnection
    assert connection_class("unix:///tmp/none.sock") is UnixDomainSocketConnection


async def test_a_transaction_round_trips_through_a_real_redis(tmp_path: Path) -> None:
    async with running_redis(tmp_path) as server:
        client = redis_client(server.url)
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset("h", mapping={"a": "1", "b": b"\x00\xff"})
                pipe.zadd("z", {b"1:1:normal:x": 1})
                pipe.set("n", 7)
                assert await pipe.execute() == [2, 1, True]
            assert await client.hgetall("h") == {b"a": b"1", b"b": b"\x00\xff"}
            assert await client.get("n") == b"7"
        finally:
            await client.aclose()
