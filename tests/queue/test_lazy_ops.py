"""What a partition leader saves and ships at once, and what it lets wait.

Regressions (queue_bench with 32 consumers): every delivery and every ack cost a Redis
transaction on each replica and a replication request per follower the moment it was
applied; and every consume through a node asked each other partition leader for
messages at the start and the end of its long poll, hundreds of calls a second that
came back empty (at 30 msgs/s the consumers cost the cluster half a core)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from service.metrics import NodeMetrics
from service.queue.base import REMOTE_EMPTY_SECONDS, Delivered
from service.queue.meta import QueueMeta
from service.queue.ops import Ack, Publish
from service.queue.partition import PartitionState
from service.queue.replica import LAZY_OPS_SECONDS, GroupFlusher, PartitionReplica
from service.queue.service import QueueService
from service.queue.store import MemoryPartitionStore, Position, SaveItem
from service.statemachine import Command


class CountingStore(MemoryPartitionStore):
    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    async def save_many(self, batch: Sequence[SaveItem]) -> None:
        self.rounds += 1
        await super().save_many(batch)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def leading_replica() -> tuple[PartitionReplica, CountingStore, list[int]]:
    """A leader with two published messages, everything shipped; `shipped` records the
    position at every wake-up of the senders."""
    store = CountingStore()
    replica = PartitionReplica("n1", "q", 0, PartitionState(), Position(), store,
                               GroupFlusher(store))
    shipped: list[int] = []
    replica.on_ops = lambda r: shipped.append(r.position.seq)
    replica.become_leader(1, ("n1",), 0, 5)
    replica.apply_local([Publish(1, "a", None, "1"), Publish(2, "b", None, "2")])
    await replica.flush()
    shipped.clear()
    store.rounds = 0
    return replica, store, shipped


def deliver_and_ack(replica: PartitionReplica, offset: int) -> list[Any]:
    ops = replica.state.plan_deliver("g", "c", 1, 1000, 0, 5)
    assert ops, "nothing to deliver"
    return [*ops, Ack("g", offset)]


async def test_deliveries_and_acks_are_saved_and_shipped_together_after_a_moment() -> None:
    replica, store, shipped = await leading_replica()
    replica.apply_local(deliver_and_ack(replica, 1), lazy=True)
    replica.apply_local(deliver_and_ack(replica, 2), lazy=True)
    await settle()
    assert shipped == [] and store.rounds == 0
    await asyncio.sleep(LAZY_OPS_SECONDS * 3)
    assert shipped == [replica.position.seq] and store.rounds == 1
    assert replica.durable_seq == replica.position.seq


async def test_ops_someone_waits_for_take_the_waiting_ones_with_them() -> None:
    replica, store, shipped = await leading_replica()
    replica.apply_local(deliver_and_ack(replica, 1), lazy=True)
    seq = replica.apply_local([Publish(3, "c", None, "3")])
    await settle()
    assert shipped == [seq] and store.rounds == 1 and replica.durable_seq == seq
    await asyncio.sleep(LAZY_OPS_SECONDS * 3)
    assert shipped == [seq] and store.rounds == 1  # nothing left to go on its own


async def test_stepping_down_drops_the_pending_shipment() -> None:
    replica, store, shipped = await leading_replica()
    replica.apply_local(deliver_and_ack(replica, 1), lazy=True)
    replica.step_down()
    await asyncio.sleep(LAZY_OPS_SECONDS * 3)
    assert shipped == [] and store.rounds == 0


def node_of_a_queue_led_elsewhere() -> QueueService:
    service = QueueService("n1", NodeMetrics("n1"), MemoryPartitionStore())
    result = service.meta.apply(1, Command("queue.create", {
        "queue": "q", "partitions": 2, "replicas": 3, "max_length": 100,
        "delivery_limit": 5, "placement": [["n2", "n1", "n3"], ["n3", "n1", "n2"]],
    }))
    assert result["status"] == "created", result
    return service


def node_with_fake_leaders(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[QueueService, QueueMeta, list[str], dict[str, list[Any]]]:
    """The node, its queue, the leaders its remote consumes asked (in order), and what
    each leader answers (nothing, until a test puts deliveries there)."""
    service = node_of_a_queue_led_elsewhere()
    meta = service.meta.get("q")
    assert meta is not None
    asked: list[str] = []
    answers: dict[str, list[Any]] = {"n2": [], "n3": []}

    async def rpc(node: str, name: str, body: dict[str, Any], timeout: float = 1.0) -> Any:
        asked.append(node)
        return 200, answers[node]

    monkeypatch.setattr(service, "_rpc", rpc)
    return service, meta, asked, answers


async def test_a_leader_that_had_nothing_is_not_asked_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, meta, asked, answers = node_with_fake_leaders(monkeypatch)
    assert await service._consume_remote(meta, "g", "c", 10, 1000) == []
    assert sorted(asked) == ["n2", "n3"]
    assert await service._consume_remote(meta, "g", "c", 10, 1000) == []
    assert len(asked) == 2  # both had nothing a moment ago
    await asyncio.sleep(REMOTE_EMPTY_SECONDS * 1.5)
    answers["n3"] = [Delivered("m1", "1.1.1", 1, None, '"x"', 1).to_wire()]
    got = await service._consume_remote(meta, "g", "c", 10, 1000)
    assert [d.id for d in got] == ["m1"] and sorted(asked[2:]) == ["n2", "n3"]
    # A leader that had messages is asked again at once; the empty one is not.
    await service._consume_remote(meta, "g", "c", 10, 1000)
    assert asked[4:] == ["n3"]
    # Other groups are not held back by this group's empty answers.
    await service._consume_remote(meta, "other", "c", 10, 1000)
    assert sorted(asked[5:]) == ["n2", "n3"]


async def test_the_empty_marks_of_many_groups_do_not_pile_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, meta, _, _ = node_with_fake_leaders(monkeypatch)
    sizes = []
    for rounds in range(3):
        for i in range(1500):
            await service._consume_remote(meta, f"g{rounds}-{i}", "c", 10, 1000)
            sizes.append(len(service._remote_empty_until))
        await asyncio.sleep(REMOTE_EMPTY_SECONDS * 1.5)  # every mark so far runs out
    # 9,000 marks were made; those run out are dropped once 4,096 are kept.
    assert max(sizes) <= 4096 + 1 and sizes[-1] < 4096
