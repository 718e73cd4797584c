"""Version 1: the key layout documented in service/storage/keys.py.

Nothing to write: in that layout an absent key is the empty value (term 0 with no vote,
an empty log, no snapshot, applied index 0), so a fresh Redis already is a version 1
store. Recording the version still matters: it is what later migrations start from and
what lets an older node refuse a store written by a newer one.
"""

from __future__ import annotations

from redis.asyncio import Redis

VERSION = 1
NAME = "initial"


async def up(redis: Redis) -> None:
    return None
