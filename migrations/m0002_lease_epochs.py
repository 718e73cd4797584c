"""Version 2: lock deadlines carry their lease epoch.

A leader change no longer rewrites every lock's deadlines: it starts a lease epoch,
recorded in the hash `dsync:lock:` (`epoch`, `now_ms`), and a hold or wait written since
carries the epoch its deadline was set in (`holder:<owner>` = `...|expires_at_ms@epoch`,
see service/locks/codec.py). A value without `@epoch` is epoch 0, so every version 1
store already reads correctly and there is nothing to rewrite. Recording the version
makes a node from before this change refuse the store instead of failing on the first
`@` it parses.
"""

from __future__ import annotations

from redis.asyncio import Redis

VERSION = 2
NAME = "lease-epochs"


async def up(redis: Redis) -> None:
    return None
