"""The follower side of queue replication, in process: what a replica accepts and refuses.

Regressions: a malformed item raised out of the handler (a 400 for the whole request, so
every partition in it stalled), and a bad op in the middle of a batch left the ops before
it applied with the position unchanged, so the resent batch applied them twice.
"""

from __future__ import annotations

from typing import Any

from service.metrics import NodeMetrics
from service.queue.ops import Publish, encode_op
from service.queue.replication import _op_bytes
from service.queue.service import QueueService
from service.queue.store import MemoryPartitionStore
from service.statemachine import Command


def service_on(node: str) -> QueueService:
    """Node `node` with queue q: one partition on n1 (its leader) and n2."""
    service = QueueService(node, NodeMetrics(node), MemoryPartitionStore())
    result = service.meta.apply(1, Command("queue.create", {
        "queue": "q", "partitions": 1, "replicas": 2, "max_length": 100,
        "delivery_limit": 5, "placement": [["n1", "n2"]],
    }))
    assert result["status"] == "created", result
    return service


def follower() -> QueueService:
    return service_on("n2")


def item(**fields: Any) -> dict[str, Any]:
    return {"q": "q", "p": 0, "epoch": 1, "upto": 2, **fields}


async def test_ops_that_follow_the_position_are_applied_and_acknowledged() -> None:
    service = follower()
    ops = [[7, encode_op(Publish(1, "a", None, "1"))], [7, encode_op(Publish(2, "b", None, "2"))]]
    [reply] = await service.handle_replicate("n1", [item(prev=[0, 0], ops=ops)])
    assert reply == {"ok": True, "seq": 2, "stamp": 7}
    assert sorted(service.replicas[("q", 0)].state.ids) == ["a", "b"]


async def test_a_bad_op_rejects_the_whole_batch() -> None:
    service = follower()
    ops = [[7, encode_op(Publish(1, "a", None, "1"))], [7, ["p", "not-an-offset"]]]
    [reply] = await service.handle_replicate("n1", [item(prev=[0, 0], ops=ops)])
    assert reply == {"ok": False, "error": "bad_item"}
    replica = service.replicas[("q", 0)]
    assert replica.position.seq == 0 and len(replica.state) == 0


async def test_malformed_items_get_error_replies_not_exceptions() -> None:
    service = follower()
    replies = await service.handle_replicate("n1", [
        item(prev="nonsense", ops=[]),
        item(prev=[0, 0]),  # no ops
        item(replace={"end": "x"}, seq=1, stamp=1),
        {"q": "q"},
        item(q="unknown", prev=[0, 0], ops=[]),
    ])
    assert [r.get("error") for r in replies] == [
        "bad_item", "bad_item", "bad_item", "bad_item", "unknown_queue"
    ]


async def test_a_mismatched_position_is_reported_for_the_leader_to_resolve() -> None:
    service = follower()
    [reply] = await service.handle_replicate("n1", [item(prev=[5, 9], ops=[])])
    assert reply == {"ok": False, "seq": 0, "stamp": 0}


async def test_an_older_epoch_is_refused() -> None:
    service = follower()
    service.meta.apply(2, Command("queue.move", {
        "queue": "q", "partition": 0, "epoch": 1, "leader": "n2", "isr": ["n1", "n2"]}))
    [reply] = await service.handle_replicate("n1", [item(prev=[0, 0], ops=[])])
    assert reply == {"ok": False, "error": "stale_epoch"}


# --- the leader side: a follower that went back (its storage was lost) ------------------


def leader() -> QueueService:
    return service_on("n1")


async def test_a_follower_that_went_back_is_followed_from_where_it_really_is() -> None:
    service = leader()
    replica = await service._replica("q", 0)
    replica.become_leader(1, ("n1", "n2"), 0, 77)
    replica.apply_local([Publish(1, "a", None, "1"), Publish(2, "b", None, "2")])
    replica.follower_ack("n2", replica.position.seq)  # it held all, before it lost them
    replica.follower_caught_up_at["n2"] = 123.0
    probe = {"q": "q", "p": 0, "epoch": 1, "upto": replica.position.seq}
    service._replication_replies("n2", [probe], [{"ok": False, "seq": 0, "stamp": 0}])
    assert replica.follower_acked["n2"] == 0
    assert "n2" not in replica.follower_caught_up_at  # not "caught up" because it once was
    items, _ = service._replication_items("n2")
    # Everything again, from the start (before the fix: nothing, as if it still held it).
    assert [len(i.get("ops", [])) for i in items] == [replica.position.seq]
    assert items[0]["prev"][0] == 0


async def test_a_follower_far_behind_on_large_messages_gets_requests_of_a_few_mib() -> None:
    service = leader()
    replica = await service._replica("q", 0)
    replica.become_leader(1, ("n1", "n2"), 0, 77)
    body = "z" * 1_000_000
    replica.apply_local([Publish(i, f"m{i}", None, body) for i in range(1, 31)])
    replica.follower_ack("n2", 0)
    items, more = service._replication_items("n2")
    assert more and len(items) == 1
    shipped = items[0]["ops"]
    assert 1 <= len(shipped) < 30
    assert sum(_op_bytes(op) for _, op in shipped) <= 9 * 1024 * 1024


def three_replica_leader() -> QueueService:
    """n1 leading queue q3: one partition on n1, n2 and n3."""
    service = QueueService("n1", NodeMetrics("n1"), MemoryPartitionStore())
    result = service.meta.apply(1, Command("queue.create", {
        "queue": "q3", "partitions": 1, "replicas": 3, "max_length": 1000,
        "delivery_limit": 5, "placement": [["n1", "n2", "n3"]],
    }))
    assert result["status"] == "created", result
    return service


def ok_reply(service: QueueService, peer: str, seq: int) -> None:
    replica = service.replicas[("q3", 0)]
    item = {"q": "q3", "p": 0, "epoch": replica.leader_epoch, "upto": seq}
    service._replication_replies(peer, [item], [{"ok": True, "seq": seq, "stamp": 0}])


async def test_ops_every_follower_holds_leave_the_buffer() -> None:
    """Regression: the leader kept up to 50,000 shipped ops per partition after every
    follower held them, which full garbage collections walked (100-250 ms pauses in
    queue_bench)."""
    service = three_replica_leader()
    replica = await service._replica("q3", 0)
    replica.become_leader(1, ("n1", "n2", "n3"), 0, 77)
    replica.apply_local([Publish(i, f"m{i}", None, "x") for i in range(1, 21)])
    end = replica.position.seq
    ok_reply(service, "n2", end)
    # n3 has not answered this leadership: everything stays for it.
    assert len(replica.buffer) == end
    ok_reply(service, "n3", 5)
    # Kept from n3's position on, including the op at it (its stamp continues the chain).
    assert replica.buffer[0].seq == 5
    items, _ = service._replication_items("n3")
    assert items[0]["prev"] == [5, replica.stamp_at(5)]
    assert [stamp for stamp, _ in items[0]["ops"]] == [replica.stamp] * (end - 5)
    ok_reply(service, "n3", end)
    assert [op.seq for op in replica.buffer] == [end]
    # More ops go out to both as usual.
    replica.apply_local([Publish(21, "m21", None, "x")])
    for peer in ("n2", "n3"):
        items, _ = service._replication_items(peer)
        assert items[0]["prev"] == [end, replica.stamp] and len(items[0]["ops"]) == 1


async def test_a_follower_behind_the_released_ops_gets_the_whole_state() -> None:
    service = three_replica_leader()
    replica = await service._replica("q3", 0)
    replica.become_leader(1, ("n1", "n2", "n3"), 0, 77)
    replica.apply_local([Publish(i, f"m{i}", None, "x") for i in range(1, 11)])
    ok_reply(service, "n2", replica.position.seq)
    ok_reply(service, "n3", replica.position.seq)
    # n3 lost its disk and comes back empty: the ops it needs were released.
    probe = {"q": "q3", "p": 0, "epoch": 1, "upto": replica.position.seq}
    service._replication_replies("n3", [probe], [{"ok": False, "seq": 0, "stamp": 0}])
    items, _ = service._replication_items("n3")
    assert "replace" in items[0] and items[0]["seq"] == replica.position.seq


async def test_the_index_of_led_replicas_follows_leadership() -> None:
    """Replication, ISR checks and trimming visit `leading_replicas` only; a replica
    missing from it would never ship its ops."""
    service = three_replica_leader()
    replica = await service._replica("q3", 0)
    assert service.leading_replicas == {}
    assert service._replication_items("n2") == ([], False)
    replica.become_leader(1, ("n1", "n2", "n3"), 0, 77)
    assert service.leading_replicas == {("q3", 0): replica}
    items, _ = service._replication_items("n2")
    assert [(i["q"], i["p"]) for i in items] == [("q3", 0)]
    # A newer epoch from another leader makes it step down through replication.
    service.meta.apply(2, Command("queue.move", {
        "queue": "q3", "partition": 0, "epoch": 1, "leader": "n2", "isr": ["n1", "n2"]}))
    [reply] = await service.handle_replicate(
        "n2", [{"q": "q3", "p": 0, "epoch": 2, "upto": 0, "prev": [0, 0], "ops": []}]
    )
    assert "error" not in reply  # the epoch was taken; only its position was asked
    assert not replica.leading and service.leading_replicas == {}
    assert service._replication_items("n3") == ([], False)
