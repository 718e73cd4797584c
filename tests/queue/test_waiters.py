"""Long-polling consumers on a node are woken one at a time (service/queue/waiters.py).

Regression: every new message woke every consumer waiting on the node; with a dozen
consumers per node, all but one scanned the partitions for nothing, and the consumers
that did get a message mostly returned it alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.metrics import NodeMetrics
from service.queue.base import LONG_POLL_SLICE_SECONDS, parse_receipt
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


def count_looks(service: QueueService, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[how often the service looked at its partitions for a consumer], kept current."""
    looks = [0]
    consume_local = service.consume_local

    def counted(*args: Any) -> Any:
        looks[0] += 1
        return consume_local(*args)

    monkeypatch.setattr(service, "consume_local", counted)
    return looks


async def test_one_new_message_wakes_one_consumer_and_the_rest_keep_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = single_node_queue()
    await leading(service)
    looks = count_looks(service, monkeypatch)
    assert await consumers_answered(service, 3, 10, ["m1"]) == [["m1"]]
    assert looks[0] == 3 + 1  # each looked once before waiting; only the woken one again


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


# --- what wakes a long poll, and what does not ------------------------------------------


def receipt_of(delivered: Any) -> tuple[int, int, int]:
    return parse_receipt(delivered.receipt)


async def test_idle_long_polls_do_not_look_again_until_something_happens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # They used to look every 0.1 s (and ask the other nodes every 0.5 s): 2,000 idle
    # long polls on a 3-node cluster cost it a core.
    service = single_node_queue()
    await leading(service)
    looks = count_looks(service, monkeypatch)
    polls = [asyncio.ensure_future(service.consume("q", "g", f"c{i}", 1, 1000, 5000))
             for i in range(20)]
    await asyncio.sleep(0.5)
    assert looks[0] == 20 and not any(p.done() for p in polls)
    for poll in polls:
        poll.cancel()
    await settle()


async def test_a_delivery_whose_visibility_ends_wakes_a_waiting_consumer() -> None:
    service = single_node_queue()
    await leading(service)
    await service.publish_local("q", 0, [("m1", None, '"x"')])
    await service.consume("q", "g", "a", 1, 100, 0)  # visible again in 0.1 s
    started = asyncio.get_running_loop().time()
    [again] = await service.consume("q", "g", "b", 1, 1000, 5000)
    took = asyncio.get_running_loop().time() - started
    assert again.id == "m1" and again.delivery_count == 2
    assert took < LONG_POLL_SLICE_SECONDS / 2, took  # the timer, not the safety look


async def test_a_nack_with_a_delay_wakes_a_waiting_consumer_when_it_ends() -> None:
    service = single_node_queue()
    await leading(service)
    await service.publish_local("q", 0, [("m1", None, '"x"')])
    [first] = await service.consume("q", "g", "a", 1, 60_000, 0)
    waiting = asyncio.ensure_future(service.consume("q", "g", "b", 1, 1000, 5000))
    await settle()
    assert service.settle_local("q", "g", [receipt_of(first)], 100) == ["nacked"]
    started = asyncio.get_running_loop().time()
    [again] = await waiting
    assert again.id == "m1"
    assert asyncio.get_running_loop().time() - started < LONG_POLL_SLICE_SECONDS / 2


async def test_an_ack_that_frees_a_key_wakes_a_waiting_consumer() -> None:
    service = single_node_queue()
    await leading(service)
    await service.publish_local("q", 0, [("k1", "key", '"1"'), ("k2", "key", '"2"')])
    [first] = await service.consume("q", "g", "a", 10, 60_000, 0)
    assert first.id == "k1"  # k2 waits for k1's ack
    waiting = asyncio.ensure_future(service.consume("q", "g", "b", 10, 1000, 5000))
    await settle()
    assert not waiting.done()
    assert service.settle_local("q", "g", [receipt_of(first)], None) == ["acked"]
    await settle(20)
    assert waiting.done() and [d.id for d in waiting.result()] == ["k2"]


async def test_a_watch_answers_when_messages_may_be_deliverable_to_its_group() -> None:
    service = single_node_queue()
    await leading(service)
    assert await service.watch("q", "g", 0.05) is False  # nothing: times out
    watching = asyncio.ensure_future(service.watch("q", "g", 5))
    await settle()
    await service.publish_local("q", 0, [("m1", None, '"x"')])
    await settle()
    assert watching.done() and watching.result() is True
    assert await service.watch("q", "g", 5) is True  # there now: at once
    assert len(await service.consume("q", "g", "a", 1, 100, 0)) == 1
    assert await service.watch("q", "other", 5) is True  # another group: still there
    started = asyncio.get_running_loop().time()
    assert await service.watch("q", "g", 5) is True  # when its visibility ends
    assert asyncio.get_running_loop().time() - started < 1.0
    assert not service._message_waiters.watched("q")


async def test_thousands_of_waiters_leave_the_line_without_walking_it() -> None:
    waiters = MessageWaiters()
    polls = [asyncio.ensure_future(waiters.wait("q", "g", 5)) for _ in range(3_000)]
    await settle()
    for poll in polls[::2]:
        poll.cancel()
    await settle()
    assert waiters.waiting("q", "g") == 1_500
    waiters.notify("q")
    await settle()
    assert polls[1].done() and not polls[3].done()  # the longest waiting still in line
    for poll in polls:
        poll.cancel()
    await settle()
    assert not waiters._waiting


async def test_consumers_waiting_get_a_watch_at_a_partitions_new_leader_at_once() -> None:
    # The watches of a node follow its waiting consumers' next look; a partition that
    # moved while they waited would have been watched only after their 2 s look.
    service = QueueService("n1", NodeMetrics("n1"), MemoryPartitionStore())
    created = service.meta.apply(1, Command("queue.create", {
        "queue": "q", "partitions": 1, "replicas": 3, "max_length": 100,
        "delivery_limit": 5, "placement": [["n2", "n1", "n3"]],
    }))
    assert created["status"] == "created", created
    poll = asyncio.ensure_future(service.consume("q", "g", "c", 1, 1000, 5000))
    await settle()
    assert service._watching == {("q", "g", "n2")}
    moved = service.meta.apply(2, Command("queue.move", {
        "queue": "q", "partition": 0, "epoch": 1, "leader": "n3",
    }))
    assert moved == {"status": "ok", "epoch": 2}, moved
    await service._reconcile()
    assert ("q", "g", "n3") in service._watching and not poll.done()
    poll.cancel()
    await service.stop()
