"""WriteBatch: hash writes as one atomic script call, on fakeredis and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.storage.embedded import EmbeddedRedis
from service.storage.write_batch import CHUNK, WriteBatch, write_batch_script
from tests.helpers.redis_server import fresh_redis, redis_connector
from tests.helpers.redis_spy import redis_calls


@pytest.fixture(params=["fakeredis", "redis"])
async def redis(
    request: pytest.FixtureRequest, shared_redis: EmbeddedRedis
) -> AsyncIterator[Redis]:
    async with fresh_redis(redis_connector(request.param, shared_redis)) as handle:
        yield handle.client


def test_the_program_names_each_key_once_and_counts_each_steps_arguments() -> None:
    batch = WriteBatch()
    batch.delete("h")
    batch.hset("h", {"a": "1", "b": "2"})
    batch.hdel("g", ["x"])
    batch.hdel("h", [])  # nothing to delete: no step
    assert batch._keys == ["h", "g"]
    assert batch._args == ["DEL", 1, 0, "HSET", 1, 4, "a", "1", "b", "2", "HDEL", 2, 1, "x"]


def test_long_steps_are_cut_into_whole_pairs() -> None:
    batch = WriteBatch()
    batch.hset("h", {f"f{i}": str(i) for i in range(CHUNK)})  # 2 * CHUNK arguments
    steps = [i for i, arg in enumerate(batch._args) if arg == "HSET"]
    assert len(steps) == 2
    assert batch._args[steps[0] + 2] == CHUNK and batch._args[steps[1] + 2] == CHUNK
    assert batch._args[steps[1] + 3] == f"f{CHUNK // 2}"  # the second step starts on a field


async def test_writes_apply_in_order(redis: Redis) -> None:
    await redis.hset("h", mapping={"old": "1", "keep": "2"})
    batch = WriteBatch()
    batch.delete("h")
    batch.hset("h", {"a": "1", "b": "2", "c": "3"})
    batch.hdel("h", ["b"])
    batch.hset("g", {"x": b"\x00\xff"})
    await batch.execute(write_batch_script(redis))
    assert await redis.hgetall("h") == {b"a": b"1", b"c": b"3"}
    assert await redis.hgetall("g") == {b"x": b"\x00\xff"}


async def test_a_hash_bigger_than_lua_can_unpack_at_once(redis: Redis) -> None:
    # 5,000 fields are 10,000 arguments; Lua's unpack refuses about 8,000 in one go.
    fields = {f"f{i}": str(i) for i in range(5_000)}
    batch = WriteBatch()
    batch.hset("big", fields)
    await batch.execute(write_batch_script(redis))
    assert await redis.hlen("big") == 5_000
    batch = WriteBatch()
    batch.hdel("big", [f"f{i}" for i in range(4_999)])
    await batch.execute(write_batch_script(redis))
    assert await redis.hgetall("big") == {b"f4999": b"4999"}


async def test_the_script_loads_itself_again_after_redis_forgot_it(redis: Redis) -> None:
    script = write_batch_script(redis)
    first = WriteBatch()
    first.hset("h", {"a": "1"})
    await first.execute(script)
    await redis.script_flush()  # what a restart of Redis does to its script cache
    second = WriteBatch()
    second.hset("h", {"b": "2"})
    await second.execute(script)
    assert await redis.hgetall("h") == {b"a": b"1", b"b": b"2"}


async def test_an_empty_batch_sends_nothing(redis: Redis) -> None:
    with redis_calls(redis) as calls:
        await WriteBatch().execute(write_batch_script(redis))
    assert calls.commands == [] and calls.pipelines == [] and len(WriteBatch()) == 0


async def test_a_batch_redis_refuses_raises_and_writes_nothing(
    shared_redis: EmbeddedRedis,
) -> None:
    """As when its disk fails (MISCONF): Redis refuses every write, the caller gets the
    error and acknowledges nothing. NOREPLICAS is the refusal a test can turn on."""
    async with fresh_redis(redis_connector("redis", shared_redis)) as handle:
        redis = handle.client
        await redis.config_set("min-replicas-to-write", 1)
        try:
            batch = WriteBatch()
            batch.delete("h")
            batch.hset("h", {"a": "1"})
            with pytest.raises(ResponseError, match="NOREPLICAS"):
                await batch.execute(write_batch_script(redis))
        finally:
            await redis.config_set("min-replicas-to-write", 0)
        assert await redis.exists("h") == 0


async def test_an_xadd_that_may_exist_skips_an_id_already_stored(redis: Redis) -> None:
    await redis.xadd("s", {"n": "1"}, id="1-0")
    batch = WriteBatch()
    batch.xadd("s", {"n": "1"}, "1-0", may_exist=True)  # a save sent again
    batch.xadd("s", {"n": "2"}, "2-0", may_exist=True)
    batch.hset("after", {"ran": "yes"})
    await batch.execute(write_batch_script(redis))
    assert [fields for _, fields in await redis.xrange("s")] == [{b"n": b"1"}, {b"n": b"2"}]
    assert await redis.hget("after", "ran") == b"yes"


async def test_an_xadd_that_must_be_new_or_another_error_stops_the_batch(redis: Redis) -> None:
    await redis.xadd("s", {"n": "1"}, id="5-0")
    script = write_batch_script(redis)
    batch = WriteBatch()
    batch.xadd("s", {"n": "1"}, "5-0")
    batch.hset("after", {"ran": "yes"})
    with pytest.raises(ResponseError, match="equal or smaller"):
        await batch.execute(script)
    await redis.hset("not-a-stream", mapping={"a": "1"})
    batch = WriteBatch()
    batch.xadd("not-a-stream", {"n": "1"}, "1-0", may_exist=True)
    batch.hset("after", {"ran": "yes"})
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await batch.execute(script)
    assert await redis.exists("after") == 0


async def test_stream_trims_are_exact(redis: Redis) -> None:
    batch = WriteBatch()
    for n in range(1, 8):
        batch.xadd("s", {"n": str(n)}, f"{n}-0")
    batch.xtrim_minid("s", "3-0")
    for n in range(5):
        batch.xadd("dead", {"n": str(n)}, maxlen=3)
    await batch.execute(write_batch_script(redis))
    assert [entry_id for entry_id, _ in await redis.xrange("s")] == [
        f"{n}-0".encode() for n in range(3, 8)
    ]
    assert [fields[b"n"] for _, fields in await redis.xrange("dead")] == [b"2", b"3", b"4"]


async def test_the_same_batch_as_a_transaction_writes_the_same(redis: Redis) -> None:
    """`execute_as_transaction` (for batches too large for one command) against the
    script: same writes, same tolerance of an XADD already made, same errors."""

    def batch_of(prefix: str) -> WriteBatch:
        batch = WriteBatch()
        batch.delete(prefix + "h")
        batch.hset(prefix + "h", {f"f{i}": str(i) for i in range(1_200)})  # two steps
        batch.hdel(prefix + "h", ["f0", "f1"])
        batch.xadd(prefix + "s", {"n": "1"}, "1-0", may_exist=True)  # made already
        batch.xadd(prefix + "s", {"n": "2"}, "2-0", may_exist=True)
        batch.xadd(prefix + "dead", {"n": "x"}, maxlen=1)
        batch.xtrim_minid(prefix + "s", "2-0")
        return batch

    for prefix in ("script:", "multi:"):
        await redis.hset(prefix + "h", mapping={"stale": "1"})
        await redis.xadd(prefix + "s", {"n": "1"}, id="1-0")
    await batch_of("script:").execute(write_batch_script(redis))
    await batch_of("multi:").execute_as_transaction(redis)
    assert await redis.hgetall("multi:h") == await redis.hgetall("script:h")
    assert await redis.xrange("multi:s") == await redis.xrange("script:s")
    dead = [[fields for _, fields in await redis.xrange(p + "dead")] for p in ("multi:", "script:")]
    assert dead[0] == dead[1] == [{b"n": b"x"}]  # ids are the server's clock: not compared
    assert await redis.hlen("multi:h") == 1_198
    again = WriteBatch()
    again.xadd("multi:s", {"n": "2"}, "2-0")  # must be new: an error, as from the script
    with pytest.raises(ResponseError, match="equal or smaller"):
        await again.execute_as_transaction(redis)
