"""Long-polling consumers on a node are woken one at a time (service/queue/waiters.py).

Regression: every new message woke every consumer waiting on the node; with a dozen
consumers per node, all but one scanned the partitions for nothing, and the consumers
that did get a message mostly returned it alone."""

from __future__ import annotations

import asyncio

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


async def test_one_new_message_wakes_one_consumer_and_the_rest_keep_waiting() -> None:
    service = single_node_queue()
    await leading(service)
    consumers = [
        asyncio.ensure_future(service.consume("q", "g", f"c{i}", 10, 1000, 5000))
        for i in range(3)
    ]
    await settle()
    assert service._message_waiters.waiting("q", "g") == 3
    await service.publish_local("q", 0, [("m1", None, '"x"')])
    await settle()
    done = [c for c in consumers if c.done()]
    assert len(done) == 1 and [d.id for d in done[0].result()] == ["m1"]
    assert service._message_waiters.waiting("q", "g") == 2  # not woken for nothing
    for c in consumers:
        c.cancel()
    await settle()


async def test_a_consumer_that_fills_its_batch_wakes_the_next() -> None:
    service = single_node_queue()
    await leading(service)
    consumers = [
        asyncio.ensure_future(service.consume("q", "g", f"c{i}", 1, 1000, 5000))
        for i in range(3)
    ]
    await settle()
    await service.publish_local("q", 0, [("m1", None, '"x"'), ("m2", None, '"y"')])
    await settle(20)
    done = [c for c in consumers if c.done()]
    assert sorted(d.id for c in done for d in c.result()) == ["m1", "m2"]
    assert len(done) == 2
    for c in consumers:
        c.cancel()
    await settle()


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
