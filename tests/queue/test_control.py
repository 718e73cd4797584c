"""The queue's periodic decisions, in process (service/queue/control.py): a partition
leader's ISR changes and the Raft leader's partition moves, and which partitions they
leave alone. Both walks visit every partition ten times a second, so they skip the
usual case (in sync, led by its preferred node) first; these tests hold the decisions
to what they were before that shortcut."""

from __future__ import annotations

from typing import Any

import pytest

from service.metrics import NodeMetrics
from service.queue.base import ISR_LAG_SECONDS, PEER_DOWN_SECONDS
from service.queue.replica import PartitionReplica
from service.queue.service import QueueService
from service.queue.store import MemoryPartitionStore
from service.statemachine import Command

NOW = 1_000.0


async def leader_of_partition(isr: list[str]) -> tuple[QueueService, PartitionReplica]:
    """n1 leads q/0 (replicas n1, n2, n3) with `isr`; both peers answered just now."""
    service = QueueService("n1", NodeMetrics("n1"), MemoryPartitionStore())
    created = service.meta.apply(1, Command("queue.create", {
        "queue": "q", "partitions": 1, "replicas": 3, "max_length": 100,
        "delivery_limit": 5, "placement": [["n1", "n2", "n3"]],
    }))
    assert created["status"] == "created", created
    if isr != ["n1", "n2", "n3"]:
        changed = service.meta.apply(2, Command("queue.isr", {
            "queue": "q", "partition": 0, "epoch": 1, "isr": isr,
        }))
        assert changed["status"] == "ok", changed
    service.peer_urls = {"n2": "http://n2", "n3": "http://n3"}
    replica = await service._replica("q", 0)
    replica.become_leader(1, tuple(isr), 0, 7)
    service._peer_ok = {"n2": NOW, "n3": NOW}
    return service, replica


def isr_changes(service: QueueService, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    changes: list[list[str]] = []
    monkeypatch.setattr(
        service, "_change_isr", lambda queue, partition, part, isr: changes.append(isr)
    )
    return changes


async def test_followers_in_sync_and_reachable_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, replica = await leader_of_partition(["n1", "n2", "n3"])
    replica.follower_acked = {"n2": replica.position.seq, "n3": replica.position.seq}
    changes = isr_changes(service, monkeypatch)
    service._check_isr(NOW + 0.1)
    assert changes == []
    caught_up = replica.follower_caught_up_at
    assert caught_up["n2"] == caught_up["n3"] == NOW + 0.1


async def test_an_unreachable_follower_leaves_the_isr_even_if_caught_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, replica = await leader_of_partition(["n1", "n2", "n3"])
    replica.follower_acked = {"n2": replica.position.seq, "n3": replica.position.seq}
    service._peer_ok = {"n2": NOW, "n3": NOW - PEER_DOWN_SECONDS - 0.1}
    changes = isr_changes(service, monkeypatch)
    service._check_isr(NOW)
    assert changes == [["n1", "n2"]]


async def test_a_follower_behind_for_longer_than_the_lag_leaves_the_isr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, replica = await leader_of_partition(["n1", "n2", "n3"])
    replica.follower_acked = {"n2": replica.position.seq - 1, "n3": replica.position.seq}
    replica.follower_caught_up_at = {"n2": NOW - ISR_LAG_SECONDS - 0.1, "n3": NOW}
    changes = isr_changes(service, monkeypatch)
    service._check_isr(NOW)
    assert changes == [["n1", "n3"]]


async def test_a_caught_up_reachable_follower_rejoins_the_isr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, replica = await leader_of_partition(["n1", "n2"])
    replica.follower_acked = {"n2": replica.position.seq, "n3": replica.position.seq}
    changes = isr_changes(service, monkeypatch)
    service._check_isr(NOW)
    assert changes == [["n1", "n2", "n3"]]


class RaftLeader:
    """What _control reads of the Raft runner: who was heard from when."""

    def __init__(self, last_heard: dict[str, float]) -> None:
        self.last_heard = last_heard


async def moves(service: QueueService, monkeypatch: pytest.MonkeyPatch,
                last_heard: dict[str, float]) -> list[tuple[str, tuple[str, ...]]]:
    made: list[tuple[str, tuple[str, ...]]] = []

    async def move(queue: str, partition: int, part: Any, leader: str,
                   isr: tuple[str, ...], key: Any) -> None:
        made.append((leader, isr))

    monkeypatch.setattr(service, "_move", move)
    service.runner = RaftLeader(last_heard)  # type: ignore[assignment]
    service._control(NOW)
    for task in list(service._tasks):
        await task
    return made


async def test_partitions_led_by_their_live_preferred_node_stay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, _ = await leader_of_partition(["n1", "n2", "n3"])
    service.node_id = "n2"  # the Raft leader is another node; n1 leads q/0
    assert await moves(service, monkeypatch, {"n1": NOW, "n3": NOW}) == []


async def test_a_partition_of_a_dead_leader_moves_to_a_live_in_sync_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, _ = await leader_of_partition(["n1", "n2", "n3"])
    service.node_id = "n2"
    made = await moves(service, monkeypatch, {"n1": NOW - 5.0, "n3": NOW})
    assert made == [("n2", ("n2", "n3"))]


async def test_a_partition_goes_back_to_its_preferred_node_once_it_is_in_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, _ = await leader_of_partition(["n1", "n2", "n3"])
    moved = service.meta.apply(3, Command("queue.move", {
        "queue": "q", "partition": 0, "epoch": 1, "leader": "n3",
    }))
    assert moved["status"] == "ok", moved
    service.node_id = "n2"
    assert await moves(service, monkeypatch, {"n1": NOW, "n3": NOW}) == [
        ("n1", ("n1", "n2", "n3"))
    ]
