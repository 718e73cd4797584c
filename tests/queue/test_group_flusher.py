"""The node's group flusher: one Redis transaction per round for every dirty partition.

Regression: `flush()` waited until the flusher was idle, and under steady load it never
is, so a follower's acknowledgment waited for the saves of writes that arrived after its
own (a flush took 12-16 ms at the median for 4 ms saves in queue_bench)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from service.queue.ops import Publish
from service.queue.partition import PartitionState
from service.queue.replica import GroupFlusher, PartitionReplica
from service.queue.store import MemoryPartitionStore, Position, SaveItem


class GatedStore(MemoryPartitionStore):
    """Each save round waits for a permit, so the test decides when rounds end."""

    def __init__(self) -> None:
        super().__init__()
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.rounds: list[list[tuple[str, int]]] = []

    async def save_many(self, batch: Sequence[SaveItem]) -> None:
        self.rounds.append([(queue, partition) for queue, partition, *_ in batch])
        await self.permits.get()
        await super().save_many(batch)


def replica(store: GatedStore, flusher: GroupFlusher, partition: int) -> PartitionReplica:
    return PartitionReplica("n2", "q", partition, PartitionState(), Position(), store, flusher)


def publish(r: PartitionReplica) -> None:
    offset = r.position.seq + 1
    r.apply_replicated(1, [(7, Publish(offset, f"m{r.partition}-{offset}", None, "x"))])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_flush_returns_when_its_round_is_saved_not_when_the_flusher_is_idle() -> None:
    store = GatedStore()
    flusher = GroupFlusher(store)
    busy, mine = replica(store, flusher, 0), replica(store, flusher, 1)
    publish(busy)
    await settle()
    assert store.rounds == [[("q", 0)]]  # round 1 is saving, without `mine`
    publish(mine)
    flushed = asyncio.ensure_future(mine.flush())
    store.permits.put_nowait(None)  # round 1 ends
    await settle()
    assert not flushed.done() and store.rounds[-1] == [("q", 1)]  # round 2 has `mine`
    publish(busy)  # more work arrives while round 2 saves
    store.permits.put_nowait(None)  # round 2 ends
    await settle()
    # Round 3 (`busy` only) is saving now and has no permit: `mine` must not wait for it.
    assert store.rounds[-1] == [("q", 0)]
    assert flushed.done() and mine.durable_seq == mine.position.seq == 1
    store.permits.put_nowait(None)
    await asyncio.wait_for(busy.flush(), 1.0)
    assert busy.durable_seq == 2 and store.data[("q", 0)][1].seq == 2


async def test_a_flush_with_nothing_unsaved_returns_at_once() -> None:
    store = GatedStore()
    flusher = GroupFlusher(store)
    r = replica(store, flusher, 0)
    await asyncio.wait_for(r.flush(), 0.1)
    assert store.rounds == []
