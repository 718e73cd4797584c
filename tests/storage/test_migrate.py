from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import fakeredis
import pytest
from redis.asyncio import Redis

from service.storage import keys
from service.storage.migrate import (
    Migration,
    MigrationError,
    SchemaTooNewError,
    check_sequence,
    discover,
    migrate,
)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


class Recorder:
    """Migrations that note when they run; version 2 renames a key, as a real one might."""

    def __init__(self) -> None:
        self.ran: list[int] = []

    def migrations(self) -> list[Migration]:
        async def first(redis: Redis) -> None:
            self.ran.append(1)

        async def second(redis: Redis) -> None:
            self.ran.append(2)
            if await redis.exists("dsync:old"):
                await redis.rename("dsync:old", "dsync:new")

        return [Migration(1, "initial", first), Migration(2, "rename", second)]


async def test_the_shipped_migrations_are_well_formed() -> None:
    shipped = discover()
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))
    assert shipped[0].name == "initial"


async def test_fresh_redis_gets_every_migration(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dsync.storage")
    latest = len(discover())
    assert await migrate(redis) == latest
    assert await redis.get(keys.SCHEMA_VERSION) == str(latest).encode()
    history = await redis.hgetall(keys.MIGRATIONS)
    assert b"0001_initial" in history and len(history) == latest
    applied = [r for r in caplog.records if r.getMessage() == "applying migration"]
    assert [r.version for r in applied] == list(range(1, latest + 1))  # type: ignore[attr-defined]


async def test_already_migrated_redis_is_left_as_is(redis: Redis) -> None:
    await migrate(redis)
    before = await redis.hgetall(keys.MIGRATIONS)
    assert await migrate(redis) == len(discover())
    assert await redis.hgetall(keys.MIGRATIONS) == before


async def test_pending_migrations_run_in_order_once(redis: Redis) -> None:
    recorder = Recorder()
    await redis.set("dsync:old", "v")
    assert await migrate(redis, available=recorder.migrations()[::-1]) == 2
    assert recorder.ran == [1, 2]
    assert await redis.get("dsync:new") == b"v"
    assert await migrate(redis, available=recorder.migrations()) == 2
    assert recorder.ran == [1, 2]


async def test_only_newer_migrations_run_on_an_older_store(redis: Redis) -> None:
    recorder = Recorder()
    await migrate(redis, available=recorder.migrations()[:1])
    assert await migrate(redis, available=recorder.migrations()) == 2
    assert recorder.ran == [1, 2]
    assert set(await redis.hkeys(keys.MIGRATIONS)) == {b"0001_initial", b"0002_rename"}


async def test_a_failed_migration_is_retried_at_the_next_start(redis: Redis) -> None:
    attempts: list[int] = []

    async def flaky(redis: Redis) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("lost Redis mid-migration")

    migrations = [Migration(1, "initial", Recorder().migrations()[0].up), Migration(2, "x", flaky)]
    with pytest.raises(ConnectionError):
        await migrate(redis, available=migrations)
    assert await redis.get(keys.SCHEMA_VERSION) == b"1"
    assert await migrate(redis, available=migrations) == 2
    assert len(attempts) == 2


async def test_a_newer_store_is_refused_untouched(redis: Redis) -> None:
    await redis.set(keys.SCHEMA_VERSION, 99)
    with pytest.raises(SchemaTooNewError) as caught:
        await migrate(redis)
    message = str(caught.value)
    assert "99" in message and "newer" in message and "\n" not in message
    assert await redis.get(keys.SCHEMA_VERSION) == b"99"
    assert not await redis.exists(keys.MIGRATIONS)


async def test_an_unreadable_version_is_refused(redis: Redis) -> None:
    await redis.set(keys.SCHEMA_VERSION, "banana")
    with pytest.raises(MigrationError, match="not a version"):
        await migrate(redis)


def test_migration_numbers_must_have_no_gaps() -> None:
    async def up(redis: Redis) -> None:
        return None

    with pytest.raises(MigrationError, match="no gaps"):
        check_sequence([Migration(1, "a", up), Migration(3, "c", up)])
    with pytest.raises(MigrationError, match="no gaps"):
        check_sequence([Migration(1, "a", up), Migration(1, "b", up)])
