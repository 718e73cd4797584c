"""The node's Redis client: redis.asyncio, with commands packed in C when hiredis is there.

redis-py's asyncio connection packs every command into RESP in Python, argument by
argument; the node sends thousands of small commands a second (each applied batch
rewrites lock hashes and dedup records in one MULTI), and packing was a visible share
of a follower's CPU. redis-py's own hiredis serializer (used by its sync client) packs
the same bytes in C; this connection class uses it. Replies are parsed by hiredis too
whenever it is installed (redis-py picks its parser itself).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    from redis.connection import HiredisRespSerializer

    class HiredisPackingConnection(Connection):
        """A TCP connection whose commands are packed by hiredis (same bytes, in C)."""

        _serializer = HiredisRespSerializer()

        def pack_command(self, *args: Any) -> list[bytes]:
            packed: list[bytes] = self._serializer.pack(*args)
            return packed

    CONNECTION_CLASS: type[Connection] = HiredisPackingConnection
else:  # pragma: no cover - hiredis is a pinned requirement
    CONNECTION_CLASS = Connection


def redis_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """`Redis.from_url` with the faster connection for redis:// URLs (rediss:// and
    unix:// keep the connection classes redis-py picks for them)."""
    kwargs.setdefault("connection_class", CONNECTION_CLASS)
    return aioredis.Redis.from_url(url, **kwargs)
