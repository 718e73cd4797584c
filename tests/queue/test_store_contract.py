"""One contract for every partition store: memory, fakeredis and a real redis-server.
Every check loads through a reopened store (a new object and connection), so it sees what
a restarted node would load, not what an object remembers."""

from __future__ import annotations

import random

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.queue.partition import MAX_DEAD_KEPT, PartitionState, Writes
from service.queue.store import Position, RedisPartitionStore

from .conftest import StoreBackend
from .driver import Pair, random_ops

Q = "orders"


async def save(backend: StoreBackend, state: PartitionState, seq: int, queue: str = Q,
               partition: int = 0, writes: Writes | None = None) -> Position:
    position = Position(2, seq, (2 << 32) | seq)
    await backend.store.save(queue, partition, writes if writes is not None else
                             state.take_writes(), position, state)
    return position


async def reloaded(backend: StoreBackend, queue: str = Q,
                   partition: int = 0) -> tuple[PartitionState, Position]:
    await backend.reopen()
    return await backend.store.load(queue, partition)


def busy_pair(seed: int, steps: int = 150) -> Pair:
    return random_ops(random.Random(seed), steps)


# --- save / load -----------------------------------------------------------------------


async def test_load_of_an_unknown_partition_is_empty(store_backend: StoreBackend) -> None:
    state, position = await store_backend.store.load("nope", 3)
    assert state.export() == PartitionState().export()
    assert position == Position()
    assert await store_backend.store.stored() == []


@pytest.mark.parametrize("seed", range(6))
async def test_save_after_random_ops_then_load_is_equal(
    store_backend: StoreBackend, seed: int
) -> None:
    """Saves at random points of a random op stream (each save carrying only what changed
    since the previous one); after each, a reload equals the state and position."""
    rng = random.Random(seed)
    pair = Pair()
    for seq in range(1, 9):
        random_ops(rng, rng.randint(1, 40), pair)
        position = await save(store_backend, pair.leader, seq)
        state, loaded = await reloaded(store_backend)
        assert loaded == position
        assert state.export() == pair.leader.export(), f"seed {seed}"
    # The reloaded state goes on like the original.
    state, _ = await store_backend.store.load(Q, 0)
    for now in (0, 10**6):
        assert state.plan_deliver("g1", "c", 5, 10, now, 2) == (
            pair.leader.plan_deliver("g1", "c", 5, 10, now, 2)
        )


async def test_save_of_unusual_text(store_backend: StoreBackend) -> None:
    pair = Pair()
    pair.publish(("ïd|1", "", '"ünïcode \\n|:"'), ("id 2", "k:ey|", "[]"),
                 ("*?[]\\", None, "{}"))
    pair.deliver("g", consumer="con|sumer:ï", visibility_ms=5, now=1, max_messages=2)
    await save(store_backend, pair.leader, 1)
    state, _ = await reloaded(store_backend)
    assert state.export() == pair.leader.export()


async def test_a_save_may_be_repeated_after_an_unknown_outcome(
    store_backend: StoreBackend,
) -> None:
    """A save whose reply was lost is retried with the same writes merged with later
    ones (what the replica's flusher does); the retry succeeds and loads equal."""
    pair = busy_pair(11, 80)
    first = pair.leader.take_writes()
    retried = Writes()
    retried.merge(first)
    await save(store_backend, pair.leader, 1, writes=first)  # landed, reply "lost"
    random_ops(random.Random(12), 80, pair)
    pair.deliver("g1", now=10**6, visibility_ms=1, limit=1)
    pair.deliver("g1", now=2 * 10**6, limit=1)  # dead letters in the retried batch
    retried.merge(pair.leader.take_writes())
    assert first.messages and retried.dead  # both written twice below
    position = await save(store_backend, pair.leader, 2, writes=retried)
    await save(store_backend, pair.leader, 2, writes=retried)  # and once more
    state, loaded = await reloaded(store_backend)
    assert loaded == position
    assert state.export() == pair.leader.export()


async def test_trimmed_messages_are_gone_after_load(store_backend: StoreBackend) -> None:
    pair = Pair()
    offsets = pair.put(*[None] * 150, "k")
    await save(store_backend, pair.leader, 1)
    pair.deliver("g", max_messages=200)
    pair.ack("g", *offsets[:140])
    pair.trim()
    assert pair.leader.trimmed == offsets[139]
    await save(store_backend, pair.leader, 2)
    state, _ = await reloaded(store_backend)
    assert list(state.messages) == offsets[140:]
    assert state.trimmed == offsets[139]
    assert state.export() == pair.leader.export()
    if store_backend.redis is not None:
        # What an operator sees with redis-cli too: XLEN counts only the kept messages.
        assert await store_backend.redis.xlen(f"dsync:q:{Q}:0") == len(offsets) - 140
    pair.ack("g", *offsets[140:])
    pair.trim()
    pair.put("after")
    await save(store_backend, pair.leader, 3)
    state, _ = await reloaded(store_backend)
    assert list(state.messages) == [offsets[-1] + 1]
    assert state.export() == pair.leader.export()


async def test_dead_letters_survive_load_in_order(store_backend: StoreBackend) -> None:
    pair = Pair()
    offsets = pair.put("a", None, "a", "b", None)
    pair.deliver("g2", max_messages=2, visibility_ms=1, now=0, limit=1)
    await save(store_backend, pair.leader, 1)
    pair.deliver("g1", visibility_ms=1, now=0, limit=1)
    for now in range(1, 6):
        for group in ("g1", "g2"):
            pair.deliver(group, visibility_ms=1, now=now, limit=1)
        await save(store_backend, pair.leader, 1 + now)
    dead = [(d.group, d.message.offset) for d in pair.leader.dead]
    assert sorted(dead) == sorted((g, o) for g in ("g1", "g2") for o in offsets)
    assert dead != sorted(dead)  # an order worth keeping
    state, _ = await reloaded(store_backend)
    assert state.dead == pair.leader.dead
    assert state.export() == pair.leader.export()


async def test_dead_letters_keep_only_the_latest(store_backend: StoreBackend) -> None:
    total = MAX_DEAD_KEPT + 5
    pair = Pair()
    pair.put(*[None] * total)
    for now in (0, 1):  # delivered once, then dead (a consume scans a bounded window)
        while pair.deliver("g", max_messages=total, visibility_ms=1, now=now, limit=1):
            pass
    assert len(pair.leader.dead) == MAX_DEAD_KEPT
    await save(store_backend, pair.leader, 1)
    loaded, _ = await reloaded(store_backend)
    assert loaded.dead == pair.leader.dead
    assert loaded.dead[0].message.offset == 6


async def test_replace_then_load(store_backend: StoreBackend) -> None:
    old = busy_pair(1)
    old.deliver("only-old", max_messages=3)
    await save(store_backend, old.leader, 40)
    new = busy_pair(2)
    position = Position(5, 17, 99)
    new.leader.take_writes()
    await store_backend.store.replace(Q, 0, new.leader, position)
    state, loaded = await reloaded(store_backend)
    assert loaded == position
    assert state.export() == new.leader.export()
    assert "only-old" not in state.groups
    # Saves go on from the replaced state.
    random_ops(random.Random(3), 60, new)
    position = await save(store_backend, new.leader, 18)
    state, loaded = await reloaded(store_backend)
    assert (state.export(), loaded) == (new.leader.export(), position)


async def test_replace_with_an_empty_state(store_backend: StoreBackend) -> None:
    await save(store_backend, busy_pair(4).leader, 3)
    await store_backend.store.replace(Q, 0, PartitionState(), Position(1, 0, 0))
    state, position = await reloaded(store_backend)
    assert state.export() == PartitionState().export()
    assert position == Position(1, 0, 0)


async def test_stored_lists_every_partition_of_every_queue(
    store_backend: StoreBackend,
) -> None:
    pairs = {(q, p): busy_pair(p * 7 + len(q), 40)
             for q in ("orders", "mail", "a.b-c_d") for p in (0, 1, 10)}
    for (q, p), pair in pairs.items():
        await save(store_backend, pair.leader, p + 1, queue=q, partition=p)
    await store_backend.store.replace("fresh", 2, PartitionState(), Position(1, 0, 0))
    await store_backend.reopen()
    assert await store_backend.store.stored() == sorted([*pairs, ("fresh", 2)])
    for (q, p), pair in pairs.items():
        state, position = await store_backend.store.load(q, p)
        assert state.export() == pair.leader.export(), (q, p)
        assert position.seq == p + 1
    state, _ = await store_backend.store.load("orders", 2)
    assert len(state) == 0


# --- atomicity (Redis) -------------------------------------------------------------------


async def test_a_failed_save_changes_nothing(redis_store_backend: StoreBackend) -> None:
    """A save that cannot reach Redis leaves exactly the previous save."""
    backend = redis_store_backend
    pair = busy_pair(5)
    position = await save(backend, pair.leader, 1)
    before = pair.leader.export()
    random_ops(random.Random(6), 100, pair)
    if backend.name == "fakeredis":
        down = backend.connect
        assert down is not None
        client = down()
        client.connection_pool.connection_kwargs["server"].connected = False
    else:
        client = Redis(port=1, socket_connect_timeout=0.5)
    with pytest.raises((RedisConnectionError, OSError)):
        await RedisPartitionStore(client).save(Q, 0, pair.leader.take_writes(),
                                               Position(2, 2, 2), pair.leader)
    await client.aclose()
    if backend.name == "fakeredis":
        client.connection_pool.connection_kwargs["server"].connected = True
    state, loaded = await reloaded(backend)
    assert (state.export(), loaded) == (before, position)


async def test_every_save_is_seen_whole(redis_store_backend: StoreBackend) -> None:
    """After each save, a second connection loads exactly the state at that save: no
    part of a batch is missing (or ahead)."""
    backend = redis_store_backend
    rng = random.Random(8)
    pair = Pair()
    other = backend.connect
    assert other is not None
    for seq in range(1, 15):
        random_ops(rng, rng.randint(5, 30), pair)
        position = await save(backend, pair.leader, seq)
        reader = other()
        state, loaded = await RedisPartitionStore(reader).load(Q, 0)
        await reader.aclose()
        assert (state.export(), loaded) == (pair.leader.export(), position)


async def test_load_ignores_messages_at_or_below_trimmed(
    redis_store_backend: StoreBackend,
) -> None:
    """Entries an approximate XTRIM (as earlier versions did) left behind stay trimmed."""
    backend = redis_store_backend
    pair = Pair()
    offsets = pair.put(None, None, None)
    pair.deliver("g")
    pair.ack("g", *offsets[:2])
    pair.trim()
    await save(backend, pair.leader, 1)
    assert backend.redis is not None
    stream = f"dsync:q:{Q}:0"
    await backend.redis.delete(stream)
    for o in offsets:  # the stream as a trim that dropped nothing would leave it
        await backend.redis.xadd(stream, {"id": f"x{o}", "body": "1"}, id=f"{o}-0")
    state, _ = await reloaded(backend)
    assert list(state.messages) == offsets[2:]


async def test_save_many_saves_several_partitions_together(store_backend: StoreBackend) -> None:
    """One transaction for several partitions (and queues); repeating it (a reply lost)
    changes nothing."""
    pairs = {(q, p): Pair() for q in ("a", "b") for p in (0, 3)}
    for round_ in range(4):
        batch = []
        for (q, p), pair in pairs.items():
            random_ops(random.Random(round_ * 10 + p + len(q)), 40, pair)
            writes = pair.leader.take_writes()
            batch.append((q, p, writes, Position(1, round_ + 1, 5), pair.leader))
        await store_backend.store.save_many(batch)
        if round_ % 2:
            await store_backend.store.save_many(batch)
        await store_backend.reopen()
        assert await store_backend.store.stored() == sorted(pairs)
        for (q, p), pair in pairs.items():
            state, position = await store_backend.store.load(q, p)
            assert (state.export(), position) == (pair.leader.export(),
                                                  Position(1, round_ + 1, 5)), (q, p)


async def test_a_large_save_and_replace_load_equal(store_backend: StoreBackend) -> None:
    """Thousands of messages, ids and pending deliveries in one save: the Redis store
    splits its hash writes (Lua's unpack() takes about 8000 values at most)."""
    pair = Pair()
    pair.publish(*((f"big-{i}", None if i % 3 else f"k{i % 7}", f'"{i}"') for i in range(2500)))
    pair.deliver("g1", max_messages=2500)
    position = await save(store_backend, pair.leader, 1)
    state, loaded = await reloaded(store_backend)
    assert (state.export(), loaded) == (pair.leader.export(), position)
    assert len(state.ids) == 2500 and len(state.groups["g1"].pending) > 1000
    await store_backend.store.replace(Q, 0, pair.leader, Position(3, 1, 9))
    state, loaded = await reloaded(store_backend)
    assert (state.export(), loaded) == (pair.leader.export(), Position(3, 1, 9))


async def test_a_save_that_redis_refuses_raises(redis_store_backend: StoreBackend) -> None:
    """Only a message already stored is no error; anything else Redis refuses is raised
    (here a key of the wrong type where the dedup hash belongs)."""
    backend = redis_store_backend
    assert backend.redis is not None
    await backend.redis.set(f"dsync:q:{Q}:0:ids", "not a hash")
    pair = Pair()
    pair.put("a", None)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await save(backend, pair.leader, 1)
