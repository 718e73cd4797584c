"""Queue metadata as a Raft state machine: which queues exist, their options, and for each
partition its replica set, leader, in-sync replicas and epoch.

Only this goes through Raft; messages do not (each partition leader replicates its own
op stream). The Raft leader decides placements and leader moves; partition leaders
propose ISR changes. Every change names the epoch it was decided under, so a decision
made on stale information is refused instead of undoing a newer one.

Materialised as `dsync:qmeta:<queue>` hashes:

    partitions, replicas, max_length, delivery_limit     the queue's options
    p:<i>   epoch|leader|replica,replica,...|isr,isr,...  partition i
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from service.statemachine import Command
from service.storage.protocols import HashWrite

log = logging.getLogger(__name__)

PREFIX = "dsync:qmeta:"

Result = dict[str, Any]


@dataclass(frozen=True, slots=True)
class QueueOptions:
    partitions: int = 16
    replicas: int = 3
    max_length: int = 1_000_000
    delivery_limit: int = 5

    def to_dict(self) -> dict[str, int]:
        return {
            "partitions": self.partitions,
            "replicas": self.replicas,
            "max_length": self.max_length,
            "delivery_limit": self.delivery_limit,
        }


@dataclass(frozen=True, slots=True)
class PartitionMeta:
    epoch: int
    leader: str
    replicas: tuple[str, ...]
    isr: tuple[str, ...]

    def encode(self) -> str:
        return f"{self.epoch}|{self.leader}|{','.join(self.replicas)}|{','.join(self.isr)}"

    @staticmethod
    def decode(text: str) -> PartitionMeta:
        epoch, leader, replicas, isr = text.split("|")
        return PartitionMeta(
            int(epoch), leader, tuple(r for r in replicas.split(",") if r),
            tuple(i for i in isr.split(",") if i),
        )


@dataclass(frozen=True, slots=True)
class QueueMeta:
    name: str
    options: QueueOptions
    partitions: tuple[PartitionMeta, ...]

    def leaders(self) -> set[str]:
        """The nodes that lead at least one partition of the queue."""
        return {p.leader for p in self.partitions}


def _error(code: str, message: str) -> Result:
    return {"status": "error", "code": code, "message": message}


class QueueMetaMachine:
    prefix: str = PREFIX

    def __init__(self) -> None:
        self._queues: dict[str, QueueMeta] = {}
        self._dirty: set[str] = set()

    # --- queries -----------------------------------------------------------------------

    def get(self, queue: str) -> QueueMeta | None:
        return self._queues.get(queue)

    def queues(self) -> list[QueueMeta]:
        return [self._queues[name] for name in sorted(self._queues)]

    # --- StateMachine ------------------------------------------------------------------

    def handles(self, op: str) -> bool:
        return op.startswith("queue.")

    def apply(self, index: int, command: Command) -> Result:
        try:
            if command.op == "queue.create":
                return self._create(command.args)
            if command.op == "queue.move":
                return self._move(command.args)
            if command.op == "queue.isr":
                return self._isr(command.args)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return _error("bad_command", f"{command.op}: {exc!r}")
        return _error("unknown_op", f"unknown queue operation {command.op!r}")

    def take_writes(self) -> list[HashWrite]:
        writes = []
        for name in sorted(self._dirty):
            meta = self._queues.get(name)
            fields = _encode(meta) if meta is not None else {}
            writes.append(HashWrite(PREFIX + name, fields, drop=True))
        self._dirty.clear()
        return writes

    def dump(self) -> dict[str, dict[str, str]]:
        return {PREFIX + name: _encode(meta) for name, meta in sorted(self._queues.items())}

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        queues: dict[str, QueueMeta] = {}
        for key, fields in hashes.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :]
            options = QueueOptions(
                int(fields["partitions"]), int(fields["replicas"]),
                int(fields["max_length"]), int(fields["delivery_limit"]),
            )
            parts = tuple(
                PartitionMeta.decode(fields[f"p:{i}"]) for i in range(options.partitions)
            )
            queues[name] = QueueMeta(name, options, parts)
        self._queues = queues
        self._dirty.clear()

    # --- commands ----------------------------------------------------------------------

    def _create(self, args: Mapping[str, Any]) -> Result:
        name = _text(args, "queue")
        options = QueueOptions(
            _int(args, "partitions", 1), _int(args, "replicas", 1),
            _int(args, "max_length", 1), _int(args, "delivery_limit", 1),
        )
        existing = self._queues.get(name)
        if existing is not None:
            if existing.options == options or args.get("if_absent"):
                return {"status": "exists", "options": existing.options.to_dict()}
            return _error(
                "queue_exists",
                f"queue {name!r} exists with options {existing.options.to_dict()}",
            )
        placement = args["placement"]
        if not isinstance(placement, list | tuple) or len(placement) != options.partitions:
            raise ValueError("placement must list one replica set per partition")
        parts = []
        for replicas in placement:
            nodes = _nodes(replicas, "a replica set")
            if not nodes:
                raise ValueError("a partition needs at least one replica")
            parts.append(PartitionMeta(1, nodes[0], nodes, nodes))
        self._queues[name] = QueueMeta(name, options, tuple(parts))
        self._dirty.add(name)
        return {"status": "created", "options": options.to_dict()}

    def _partition(self, args: Mapping[str, Any]) -> tuple[QueueMeta, int, PartitionMeta]:
        name = _text(args, "queue")
        meta = self._queues.get(name)
        if meta is None:
            raise ValueError(f"no queue {name!r}")
        index = _int(args, "partition", 0)
        if not 0 <= index < len(meta.partitions):
            raise ValueError(f"no partition {index}")
        return meta, index, meta.partitions[index]

    def _store(self, meta: QueueMeta, index: int, part: PartitionMeta) -> None:
        parts = list(meta.partitions)
        parts[index] = part
        self._queues[meta.name] = replace(meta, partitions=tuple(parts))
        self._dirty.add(meta.name)

    def _move(self, args: Mapping[str, Any]) -> Result:
        """A new leader (and possibly ISR) for a partition, decided at `epoch`."""
        meta, index, part = self._partition(args)
        epoch = _int(args, "epoch")
        leader = _text(args, "leader")
        isr = _nodes(args["isr"], "the ISR") if "isr" in args else part.isr
        if epoch != part.epoch:
            return {"status": "stale", "epoch": part.epoch}
        if leader not in part.replicas or leader not in isr:
            return _error("bad_command", f"{leader!r} is not an in-sync replica")
        if any(n not in part.replicas for n in isr):
            return _error("bad_command", "the ISR must hold only replicas")
        moved = PartitionMeta(part.epoch + 1, leader, part.replicas, isr)
        self._store(meta, index, moved)
        log.info("partition leader moved",
                 extra={"queue": meta.name, "partition": index, "leader": leader,
                        "epoch": moved.epoch})
        return {"status": "ok", "epoch": moved.epoch}

    def _isr(self, args: Mapping[str, Any]) -> Result:
        """The partition leader shrinks or grows its in-sync set (same epoch).

        `expect`, when given, is the ISR the proposer saw: the change applies only if
        that is still the ISR. Two nodes change the ISR at one epoch (the partition
        leader, and a node leaving after it lost its storage); without the check, a
        change computed before the other one applied would undo it, putting an empty
        replica back in the ISR. Entries written before `expect` existed lack it."""
        meta, index, part = self._partition(args)
        epoch = _int(args, "epoch")
        isr = _nodes(args["isr"], "the ISR")
        if epoch != part.epoch:
            return {"status": "stale", "epoch": part.epoch}
        if "expect" in args and _nodes(args["expect"], "the expected ISR") != part.isr:
            return {"status": "stale", "epoch": part.epoch}
        if part.leader not in isr or any(n not in part.replicas for n in isr):
            return _error("bad_command", "the ISR must hold the leader and only replicas")
        self._store(meta, index, replace(part, isr=isr))
        return {"status": "ok", "epoch": part.epoch}


# Commands come from the log as msgpack values: check their types rather than convert
# (int() of a float infinity raises OverflowError; str() of anything "works").


def _int(args: Mapping[str, Any], name: str, minimum: int | None = None) -> int:
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name!r} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name!r} must be at least {minimum}, not {value}")
    return value


def _text(args: Mapping[str, Any], name: str) -> str:
    value = args[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name!r} must be a non-empty string, not {value!r}")
    return value


def _nodes(value: Any, what: str) -> tuple[str, ...]:
    """A list of distinct node ids that the `p:<i>` encoding can hold."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"{what} must be a list of node ids, not {value!r}")
    for node in value:
        if not isinstance(node, str) or not node or "|" in node or "," in node:
            raise ValueError(f"{what} holds a bad node id {node!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{what} names a node twice: {value!r}")
    return tuple(value)


def _encode(meta: QueueMeta) -> dict[str, str]:
    fields = {k: str(v) for k, v in meta.options.to_dict().items()}
    for i, part in enumerate(meta.partitions):
        fields[f"p:{i}"] = part.encode()
    return fields
