"""QueueMetaMachine: create / move / isr with epoch checks, dump/load, materialisation,
and malformed commands answered with error results (a raise would stop the Raft runner)."""

from __future__ import annotations

import math
from typing import Any, cast

import msgpack
import pytest

from service.commands import decode_command
from service.queue.meta import PREFIX, PartitionMeta, QueueMetaMachine, QueueOptions
from service.statemachine import Command, StateMachine
from service.storage.protocols import HashWrite

PLACEMENT = [["n1", "n2", "n3"], ["n2", "n3", "n1"]]


def options(**changes: int) -> dict[str, int]:
    return {**QueueOptions(partitions=2, replicas=3).to_dict(), **changes}


def create(m: QueueMetaMachine, queue: str = "q", placement: Any = None, index: int = 1,
           opts: dict[str, int] | None = None, **args: Any) -> dict[str, Any]:
    body = {"queue": queue, **(opts or options()), "placement": placement or PLACEMENT,
            **args}
    result: dict[str, Any] = m.apply(index, Command("queue.create", body))
    return result


def move(m: QueueMetaMachine, epoch: int, leader: str, partition: int = 0,
         **args: Any) -> dict[str, Any]:
    result: dict[str, Any] = m.apply(1, Command("queue.move", {
        "queue": "q", "partition": partition, "epoch": epoch, "leader": leader, **args}))
    return result


def isr(m: QueueMetaMachine, epoch: int, members: Any, partition: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = m.apply(1, Command("queue.isr", {
        "queue": "q", "partition": partition, "epoch": epoch, "isr": members}))
    return result


def part(m: QueueMetaMachine, index: int = 0, queue: str = "q") -> PartitionMeta:
    meta = m.get(queue)
    assert meta is not None
    return meta.partitions[index]


@pytest.fixture
def m() -> QueueMetaMachine:
    machine = QueueMetaMachine()
    assert create(machine)["status"] == "created"
    machine.take_writes()
    return machine


def test_it_is_a_state_machine() -> None:
    machine: StateMachine = QueueMetaMachine()
    assert machine.prefix == PREFIX == "dsync:qmeta:"
    assert machine.handles("queue.create") and machine.handles("queue.anything")
    assert not machine.handles("lock.acquire") and not machine.handles("queues.create")


# --- create ----------------------------------------------------------------------------


def test_create_places_partitions_with_the_first_replica_leading(m: QueueMetaMachine) -> None:
    meta = m.get("q")
    assert meta is not None
    assert meta.options == QueueOptions(partitions=2, replicas=3)
    assert meta.partitions == (
        PartitionMeta(1, "n1", ("n1", "n2", "n3"), ("n1", "n2", "n3")),
        PartitionMeta(1, "n2", ("n2", "n3", "n1"), ("n2", "n3", "n1")),
    )
    assert [q.name for q in m.queues()] == ["q"]


def test_create_is_idempotent_with_the_same_options(m: QueueMetaMachine) -> None:
    before = m.dump()
    result = create(m, placement=[["n3"], ["n3"]])  # another placement changes nothing
    assert result == {"status": "exists", "options": options()}
    assert m.dump() == before
    assert m.take_writes() == []


def test_create_with_other_options_is_queue_exists(m: QueueMetaMachine) -> None:
    before = m.dump()
    result = create(m, opts=options(delivery_limit=9))
    assert result["status"] == "error" and result["code"] == "queue_exists"
    assert m.dump() == before


def test_create_if_absent_accepts_an_existing_queue_whatever_its_options(
    m: QueueMetaMachine,
) -> None:
    before = m.dump()
    assert create(m, if_absent=True, opts=options(partitions=1, max_length=5),
                  placement=[["n1"]]) == {"status": "exists", "options": options()}
    assert m.dump() == before
    created = create(m, queue="other", if_absent=True)
    assert created["status"] == "created"


def test_queues_are_listed_by_name() -> None:
    machine = QueueMetaMachine()
    for name in ("b", "a", "c"):
        create(machine, queue=name)
    assert [q.name for q in machine.queues()] == ["a", "b", "c"]
    assert machine.get("zz") is None


# --- move ------------------------------------------------------------------------------


def test_move_needs_the_current_epoch_and_increments_it(m: QueueMetaMachine) -> None:
    assert move(m, 0, "n2") == {"status": "stale", "epoch": 1}
    assert move(m, 2, "n2") == {"status": "stale", "epoch": 1}
    assert part(m).leader == "n1"
    assert move(m, 1, "n2") == {"status": "ok", "epoch": 2}
    assert part(m) == PartitionMeta(2, "n2", ("n1", "n2", "n3"), ("n1", "n2", "n3"))
    assert move(m, 1, "n3") == {"status": "stale", "epoch": 2}  # decided on stale info
    assert part(m).leader == "n2"
    assert part(m, 1).epoch == 1  # other partitions untouched


def test_move_may_set_the_isr(m: QueueMetaMachine) -> None:
    assert move(m, 1, "n3", isr=["n3", "n2"]) == {"status": "ok", "epoch": 2}
    assert part(m) == PartitionMeta(2, "n3", ("n1", "n2", "n3"), ("n3", "n2"))


def test_move_leader_must_be_an_isr_replica(m: QueueMetaMachine) -> None:
    before = m.dump()
    assert move(m, 1, "n9")["code"] == "bad_command"  # not a replica
    assert move(m, 1, "n3", isr=["n1", "n2"])["code"] == "bad_command"  # not in the ISR
    isr(m, 1, ["n1", "n2"])
    assert move(m, 1, "n3")["code"] == "bad_command"  # dropped from the ISR
    assert part(m).epoch == 1 and part(m).leader == "n1"
    assert before != m.dump()  # only the isr command changed something


def test_move_isr_must_hold_only_replicas(m: QueueMetaMachine) -> None:
    before = m.dump()
    result = move(m, 1, "n2", isr=["n2", "n9"])
    assert result["status"] == "error" and result["code"] == "bad_command"
    assert m.dump() == before


# --- isr -------------------------------------------------------------------------------


def test_isr_needs_the_current_epoch_and_keeps_it(m: QueueMetaMachine) -> None:
    assert isr(m, 2, ["n1"]) == {"status": "stale", "epoch": 1}
    assert isr(m, 1, ["n1", "n3"]) == {"status": "ok", "epoch": 1}
    assert part(m) == PartitionMeta(1, "n1", ("n1", "n2", "n3"), ("n1", "n3"))
    assert isr(m, 1, ["n1", "n3", "n2"]) == {"status": "ok", "epoch": 1}  # grows back
    move(m, 1, "n2")
    assert isr(m, 1, ["n2"]) == {"status": "stale", "epoch": 2}


def test_isr_change_with_expect_applies_only_to_the_isr_it_was_computed_from(
    m: QueueMetaMachine,
) -> None:
    """A node that lost its storage leaves the ISR while the partition leader shrinks it
    for another reason: the change computed before the leave must not put it back."""
    def change(members: list[str], expect: list[str]) -> dict[str, Any]:
        result: dict[str, Any] = m.apply(1, Command("queue.isr", {
            "queue": "q", "partition": 0, "epoch": 1, "isr": members, "expect": expect}))
        return result

    assert change(["n1", "n3"], ["n1", "n2", "n3"])["status"] == "ok"  # n2 leaves
    # The leader's shrink of n3, computed while n2 was still in:
    assert change(["n1", "n2"], ["n1", "n2", "n3"]) == {"status": "stale", "epoch": 1}
    assert part(m).isr == ("n1", "n3")
    assert change(["n1"], ["n1", "n3"])["status"] == "ok"  # recomputed from what is now
    assert part(m).isr == ("n1",)
    assert change(["n1", "n2"], ["n1", "n9"]) == {"status": "stale", "epoch": 1}
    bad = change(["n1"], "n1")  # type: ignore[arg-type]
    assert bad["status"] == "error" and bad["code"] == "bad_command"


@pytest.mark.parametrize("members", [["n2", "n3"], [], ["n1", "n9"], ["n9"]])
def test_isr_must_hold_the_leader_and_only_replicas(m: QueueMetaMachine, members: Any) -> None:
    before = m.dump()
    result = isr(m, 1, members)
    assert result["status"] == "error" and result["code"] == "bad_command"
    assert m.dump() == before
    assert m.take_writes() == []


# --- dump / load / take_writes ---------------------------------------------------------


def test_dump_load_round_trip(m: QueueMetaMachine) -> None:
    create(m, queue="other", placement=[["n2"], ["n3", "n1"]])
    move(m, 1, "n2", isr=["n2", "n1"])
    isr(m, 1, ["n3"], partition=1)
    dump = m.dump()
    again = QueueMetaMachine()
    again.load({**dump, "dsync:lock:x": {"a": "b"}})
    assert again.dump() == dump
    assert again.queues() == m.queues()
    assert again.take_writes() == []
    # The loaded machine decides the same.
    assert move(again, 2, "n1") == move(m, 2, "n1")
    assert again.dump() == m.dump()


def test_load_replaces_everything() -> None:
    machine = QueueMetaMachine()
    create(machine, queue="gone")
    machine.load({})
    assert machine.queues() == [] and machine.take_writes() == []


def test_take_writes_materialises_one_hash_per_changed_queue() -> None:
    machine = QueueMetaMachine()
    assert machine.take_writes() == []
    create(machine, queue="a")
    create(machine, queue="b", placement=[["n1"], ["n2", "n3"]])
    writes = machine.take_writes()
    assert writes == [
        HashWrite("dsync:qmeta:a", {**{k: str(v) for k, v in options().items()},
                                    "p:0": "1|n1|n1,n2,n3|n1,n2,n3",
                                    "p:1": "1|n2|n2,n3,n1|n2,n3,n1"}, drop=True),
        HashWrite("dsync:qmeta:b", {**{k: str(v) for k, v in options().items()},
                                    "p:0": "1|n1|n1|n1", "p:1": "1|n2|n2,n3|n2,n3"},
                  drop=True),
    ]
    assert machine.take_writes() == []
    assert move(machine, 1, "n2")["status"] == "error"  # no queue "q" here
    assert machine.take_writes() == []
    machine.apply(2, Command("queue.isr", {"queue": "b", "partition": 1, "epoch": 1,
                                           "isr": ["n2"]}))
    [write] = machine.take_writes()
    assert write.key == "dsync:qmeta:b" and write.fields["p:1"] == "1|n2|n2,n3|n2"
    # The writes, applied in order, are the dump.
    hashes: dict[str, dict[str, str]] = {}
    for w in [*writes, write]:
        if w.drop:
            hashes.pop(w.key, None)
        hashes.setdefault(w.key, {}).update(w.fields)
    assert hashes == machine.dump()


# --- malformed commands: error results, never a raise ----------------------------------

GOOD_CREATE: dict[str, Any] = {"queue": "new", **options(), "placement": PLACEMENT}
GOOD_MOVE: dict[str, Any] = {"queue": "q", "partition": 0, "epoch": 1, "leader": "n2"}
GOOD_ISR: dict[str, Any] = {"queue": "q", "partition": 0, "epoch": 1, "isr": ["n1"]}

BAD_VALUES: list[Any] = [None, True, -1, 0, 1.5, math.inf, math.nan, "x", "2", b"n1", [],
                         {}, ["n1", 3]]


def valid(op: str, name: str, value: Any) -> bool:
    """Values of BAD_VALUES that are fine for that field (or only stale)."""
    if name == "queue" and op == "queue.create":
        return isinstance(value, str) and value != ""
    if name == "epoch":
        return isinstance(value, int) and not isinstance(value, bool)
    return name == "partition" and value == 0 and not isinstance(value, bool)


def malformed() -> list[tuple[str, dict[str, Any]]]:
    cases: list[tuple[str, dict[str, Any]]] = []
    for op, good in (("queue.create", GOOD_CREATE), ("queue.move", GOOD_MOVE),
                     ("queue.isr", GOOD_ISR)):
        for name in good:
            cases.append((op, {k: v for k, v in good.items() if k != name}))
            cases += [(op, {**good, name: value}) for value in BAD_VALUES
                      if not valid(op, name, value)]
    cases += [
        ("queue.create", {**GOOD_CREATE, "placement": [["n1"]]}),  # too few
        ("queue.create", {**GOOD_CREATE, "placement": [["n1"], []]}),
        ("queue.create", {**GOOD_CREATE, "placement": ["n1n2", "n3"]}),  # not lists
        ("queue.create", {**GOOD_CREATE, "placement": [["n1", "n1"], ["n2"]]}),  # twice
        ("queue.create", {**GOOD_CREATE, "placement": [["n|1"], ["n2"]]}),  # separator
        ("queue.create", {**GOOD_CREATE, "placement": [["n,1"], ["n2"]]}),
        ("queue.create", {**GOOD_CREATE, "placement": [[""], ["n2"]]}),
        ("queue.create", {**GOOD_CREATE, "queue": ""}),
        ("queue.move", {**GOOD_MOVE, "partition": 2}),
        ("queue.move", {**GOOD_MOVE, "queue": "nope"}),
        ("queue.move", {**GOOD_MOVE, "isr": ["n2", "n2"]}),
        ("queue.isr", {**GOOD_ISR, "isr": ["n1", "n1"]}),
        ("queue.isr", {**GOOD_ISR, "isr": "n1"}),
        ("queue.nope", {}),
        ("queue.create", cast(dict[str, Any], {1: 2})),
    ]
    return cases


@pytest.mark.parametrize(("op", "args"), malformed(), ids=repr)
def test_malformed_commands_return_error_results(
    m: QueueMetaMachine, op: str, args: dict[str, Any]
) -> None:
    before = m.dump()
    # Through the log's own encoding, as the runner would apply it.
    raw = msgpack.packb([op, args, None, 0], use_bin_type=True)
    result = m.apply(7, decode_command(raw))
    if result.get("status") in ("ok", "created", "exists", "stale"):
        pytest.fail(f"{op} {args!r} was accepted: {result}")
    assert result["status"] == "error" and result["code"] in ("bad_command", "unknown_op")
    assert isinstance(result["message"], str)
    assert m.dump() == before
    assert m.take_writes() == []


def test_well_formed_commands_through_the_log_encoding(m: QueueMetaMachine) -> None:
    for op, args, status in (("queue.create", GOOD_CREATE, "created"),
                             ("queue.move", GOOD_MOVE, "ok"),
                             ("queue.isr", {**GOOD_ISR, "epoch": 2, "isr": ["n2"]}, "ok")):
        raw = msgpack.packb([op, args, None, 0], use_bin_type=True)
        assert m.apply(1, decode_command(raw))["status"] == status
