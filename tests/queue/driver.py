"""Helpers shared by the queue tests: a leader/follower pair of partition states fed the
same ops (the follower through the wire encoding), and a seeded random op generator."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from service.queue.ops import Ack, Deliver, Nack, Op, Rebase, decode_op, encode_op
from service.queue.partition import DEFAULT_MAX_IDS, PartitionState, PublishResult


def wire(op: Op) -> Op:
    """op as a follower receives it: encoded, packed with msgpack, unpacked, decoded."""
    return decode_op(msgpack.unpackb(msgpack.packb(encode_op(op)), raw=False))


@dataclass
class Pair:
    """A partition leader and one follower that applies every op the leader applies."""

    max_ids: int = DEFAULT_MAX_IDS
    leader: PartitionState = field(init=False)
    follower: PartitionState = field(init=False)
    log: list[Op] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.leader = PartitionState(self.max_ids)
        self.follower = PartitionState(self.max_ids)

    def apply(self, ops: Iterable[Op]) -> list[Op]:
        applied = list(ops)
        for op in applied:
            self.leader.apply(op)
            self.follower.apply(wire(op))
            self.log.append(op)
        return applied

    def publish(self, *items: tuple[str, str | None, str]) -> list[PublishResult]:
        ops, results = self.leader.plan_publish(items)
        self.apply(ops)
        return results

    def put(self, *keys: str | None) -> list[int]:
        """Publish one message per key (fresh ids); their offsets."""
        start = len(self.log)
        results = self.publish(*((f"m{start}-{i}", k, f'"{k}"') for i, k in enumerate(keys)))
        return [r.offset for r in results]

    def deliver(self, group: str, consumer: str = "c", max_messages: int = 10,
                visibility_ms: int = 100, now: int = 0, limit: int = 3) -> list[Any]:
        return self.apply(self.leader.plan_deliver(group, consumer, max_messages,
                                                   visibility_ms, now, limit))

    def delivered(self, group: str, **kw: Any) -> list[int]:
        """Offsets delivered (not dead-lettered) by one consume."""
        return [op.offset for op in self.deliver(group, **kw) if isinstance(op, Deliver)]

    def ack(self, group: str, *offsets: int) -> None:
        self.apply(Ack(group, o) for o in offsets)

    def nack(self, group: str, offset: int, visible_at: int) -> None:
        self.apply([Nack(group, offset, visible_at)])

    def trim(self) -> None:
        trim = self.leader.plan_trim()
        if trim is not None:
            self.apply([trim])

    def rebase(self, now: int) -> None:
        self.apply([Rebase(now)])


def random_ops(rng: random.Random, steps: int, pair: Pair | None = None) -> Pair:
    """Drive a Pair with random publishes, deliveries, acks, nacks, trims and rebases
    (the planned ops are all valid ones); returns it."""
    pair = pair if pair is not None else Pair()
    now = 0
    for _ in range(steps):
        roll = rng.random()
        state = pair.leader
        if roll < 0.35:
            items = [
                (rng.choice([f"id{rng.randrange(30)}", f"u{rng.random()}"]),
                 rng.choice([None, "a", "b", "c|d", ""]),
                 f'{{"n":{rng.randrange(1000)}}}')
                for _ in range(rng.randint(1, 3))
            ]
            pair.publish(*items)
        elif roll < 0.6:
            pair.deliver(rng.choice(["g1", "g2"]), rng.choice(["c1", "c|2"]),
                         rng.randint(1, 3), rng.randint(1, 40), now, 2)
        elif roll < 0.8:
            pending = [(g, o) for g, grp in state.groups.items() for o in grp.pending]
            if pending:
                g, o = rng.choice(pending)
                if rng.random() < 0.7:
                    pair.ack(g, o)
                else:
                    pair.nack(g, o, now + rng.randint(0, 30))
        elif roll < 0.9:
            now += rng.randint(1, 30)
        elif roll < 0.97:
            pair.trim()
        else:
            pair.rebase(now)
    return pair

