"""Record what a test's code sends to Redis: commands outside pipelines, and the
pipelines it opens (True for a MULTI/EXEC)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis


@dataclass
class RedisCalls:
    commands: list[str] = field(default_factory=list)
    pipelines: list[bool] = field(default_factory=list)


@contextlib.contextmanager
def redis_calls(redis: Redis) -> Iterator[RedisCalls]:
    calls = RedisCalls()
    real_execute, real_pipeline = redis.execute_command, redis.pipeline

    async def execute(*args: Any, **options: Any) -> Any:
        calls.commands.append(str(args[0]))
        return await real_execute(*args, **options)

    def pipeline(transaction: bool = True, shard_hint: str | None = None) -> Any:
        calls.pipelines.append(transaction)
        return real_pipeline(transaction=transaction, shard_hint=shard_hint)

    redis.execute_command = execute  # type: ignore[method-assign]
    redis.pipeline = pipeline  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        redis.execute_command, redis.pipeline = real_execute, real_pipeline  # type: ignore[method-assign]
