"""A node back from lost storage leaves each partition's ISR once.

Regression: it left, was added back as soon as it had caught up (and made leader again
as the preferred replica), left again, and so on: partitions changed leader every 100 ms
for as long as the disk-loss test watched (epochs past 270 in 30 s)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from service.metrics import NodeMetrics
from service.queue.service import QueueService
from service.queue.store import MemoryPartitionStore
from service.statemachine import Command

PLACEMENT = [["n1", "n2", "n3"], ["n2", "n3", "n1"]]


def victim() -> QueueService:
    service = QueueService("n1", NodeMetrics("n1"), MemoryPartitionStore())
    created = service.meta.apply(1, Command("queue.create", {
        "queue": "q", "partitions": 2, "replicas": 3, "max_length": 100,
        "delivery_limit": 5, "placement": PLACEMENT,
    }))  # fmt: skip
    assert created["status"] == "created", created
    return service


async def test_each_partition_is_left_once_even_when_the_node_is_added_back_at_once() -> None:
    service = victim()
    index = itertools.count(2)
    proposed: list[tuple[str, dict[str, Any]]] = []

    def apply(op: str, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = service.meta.apply(next(index), Command(op, args))
        return result

    async def propose_meta(op: str, args: dict[str, Any]) -> dict[str, Any]:
        proposed.append((op, args))
        result = apply(op, args)
        if result["status"] == "ok" and len(proposed) < 30:
            # At once, as a fast catch-up allows: the partition's leader adds n1 back,
            # and the Raft leader moves partition 0 back to its preferred replica, n1.
            meta = service.meta.get("q")
            assert meta is not None
            part = meta.partitions[args["partition"]]
            apply("queue.isr", {"queue": "q", "partition": args["partition"],
                                "epoch": part.epoch, "isr": [*part.isr, "n1"],
                                "expect": list(part.isr)})  # fmt: skip
            if args["partition"] == 0:
                meta = service.meta.get("q")
                assert meta is not None
                part = meta.partitions[0]
                apply("queue.move", {"queue": "q", "partition": 0, "epoch": part.epoch,
                                     "leader": "n1", "isr": list(part.isr)})  # fmt: skip
        return result

    service.propose_meta = propose_meta  # type: ignore[method-assign]
    await asyncio.wait_for(service.hand_over_after_loss(), 3)
    assert [(op, args["partition"]) for op, args in proposed] == [
        ("queue.move", 0), ("queue.isr", 1),
    ]
    assert not service.storage_lost


async def test_a_leave_that_lost_a_race_is_tried_again() -> None:
    """A proposal that found the partition changed meanwhile (stale) does not count as
    having left it."""
    service = victim()
    index = itertools.count(2)
    proposed: list[tuple[str, dict[str, Any]]] = []

    async def propose_meta(op: str, args: dict[str, Any]) -> dict[str, Any]:
        proposed.append((op, args))
        if len(proposed) == 1:
            return {"status": "stale", "epoch": args["epoch"]}
        result: dict[str, Any] = service.meta.apply(next(index), Command(op, args))
        return result

    service.propose_meta = propose_meta  # type: ignore[method-assign]
    await asyncio.wait_for(service.hand_over_after_loss(), 3)
    assert [(op, args["partition"]) for op, args in proposed] == [
        ("queue.move", 0), ("queue.isr", 1), ("queue.move", 0),
    ]
    meta = service.meta.get("q")
    assert meta is not None
    assert all("n1" not in p.isr for p in meta.partitions)
