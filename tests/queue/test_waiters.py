"""Long-polling consumers on a node are woken one at a time (service/queue/waiters.py).

Regression: every new message woke every consumer waiting on the node; with a dozen
consumers per node, all but one scanned the partitions for nothing, and the consumers
that did get a message mostly returned it alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.metrics import NodeMetrics
from service.queue.replica import PartitionReplica
from service.queue.service import QueueService
from service.queue.store import MemoryPartitionStore
from service.queue.waiters import MessageWaiters
from service.statemachine import Command


async def settle(turns: int = 10) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_a_notify_wakes_the_longest_waiting_consumer_of_each_group() -> None:
    waiters = MessageWaiters()
    first = asyncio.ensure_future(waiters.wait("q", "g", 5))
    await settle(1)
    second = asyncio.ensure_future(waiters.wait("q", "g", 5))
    other_group = asyncio.ensure_future(waiters.wait("q", "h", 5))
    other_queue = asyncio.ensure_future(waiters.wait("r", "g", 5))
    await settle()
    waiters.notify("q")
    waiters.notify("q")  # the same turn: still one wake-up per group
    await settle()
    assert first.done() and other_group.done()
    assert not second.done() and not other_queue.done()
    assert waiters.waiting("q", "g") == 1 and waiters.waiting("q", "h") == 0
    waiters.notify("q")
    await settle()
    assert second.done() and not other_queue.done()
    other_queue.cancel()
    await settle()
    assert waiters.waiting("r", "g") == 0 and not waiters._waiting


async def test_a_full_batch_passes_on_to_the_next_consumer_of_its_own_group_only() -> None:
    waiters = MessageWaiters()
    mine = asyncio.ensure_future(waiters.wait("q", "g", 5))
    other_group = asyncio.ensure_future(waiters.wait("q", "h", 5))
    await settle()
    waiters.pass_on("q", "g")
    waiters.pass_on("q", "nobody-waits")  # nothing to do, nothing kept
    await settle()
    assert mine.done() and not other_group.done()
    other_group.cancel()
    await settle()
    assert not waiters._waiting


async def test_a_wait_ends_at_its_timeout_and_leaves_the_line() -> None:
    waiters = MessageWaiters()
    started = asyncio.get_running_loop().time()
    await waiters.wait("q", "g", 0.03)
    assert asyncio.get_running_loop().time() - started >= 0.025
    assert waiters.waiting("q", "g") == 0 and not waiters._waiting
    waiters.notify("q")  # no one waits: nothing is kept for later
    await settle()
    assert not waiters._wake_scheduled


def single_node_queue() -> QueueService:
    service = QueueService("n1", NodeMetrics("n1"), MemoryPartitionStore())
    result = service.meta.apply(1, Command("queue.create", {
        "queue": "q", "partitions": 1, "replicas": 1, "max_length": 100,
        "delivery_limit": 5, "placement": [["n1"]],
    }))
    assert result["status"] == "created", result
    return service


async def leading(service: QueueService) -> PartitionReplica:
    replica = await service._replica("q", 0)
    replica.become_leader(1, ("n1",), 0, 7)
    return replica


async def consumers_answered(
    service: QueueService, consumers: int, max_messages: int, published: list[str]
) -> list[list[str]]:
    """Start `consumers` long polls on group g, publish one message per id, and return
    the ids each answered poll got (the others are cancelled)."""
    polls = [
        asyncio.ensure_future(service.consume("q", "g", f"c{i}", max_messages, 1000, 5000))
        for i in range(consumers)
    ]
    await settle()
    assert service._message_waiters.waiting("q", "g") == consumers
    await service.publish_local("q", 0, [(i, None, '"x"') for i in published])
    await settle(20)
    answered = [[d.id for d in poll.result()] for poll in polls if poll.done()]
    for poll in polls:
        poll.cancel()
    await settle()
    return answered


async def test_one_new_message_wakes_one_consumer_and_the_rest_keep_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = single_node_queue()
    await leading(service)
    looks = 0
    consume_local = service.consume_local

    def counted(*args: Any) -> Any:
        nonlocal looks
        looks += 1
        return consume_local(*args)

    monkeypatch.setattr(service, "consume_local", counted)
    assert await consumers_answered(service, 3, 10, ["m1"]) == [["m1"]]
    assert looks == 3 + 1  # each looked once before waiting; only the woken one again


async def test_a_consumer_that_fills_its_batch_wakes_the_next() -> None:
    service = single_node_queue()
    await leading(service)
    answered = await consumers_answered(service, 3, 1, ["m1", "m2"])
    assert sorted(answered) == [["m1"], ["m2"]]


async def test_every_group_gets_the_new_message() -> None:
    service = single_node_queue()
    await leading(service)
    consumers = [
        asyncio.ensure_future(service.consume("q", group, "c", 10, 1000, 5000))
        for group in ("billing", "audit")
    ]
    await settle()
    await service.publish_local("q", 0, [("m1", None, '"x"')])
    await settle()
    assert all(c.done() and [d.id for d in c.result()] == ["m1"] for c in consumers)
