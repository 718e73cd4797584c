"""The partition core: one test per delivery rule, then a seeded randomized run that
drives a leader and a follower with the same ops and checks the rules after every step."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from service.queue.ops import (
    Ack,
    Dead,
    Deliver,
    Nack,
    Op,
    OpDecodeError,
    Publish,
    Rebase,
    Trim,
    decode_op,
)
from service.queue.partition import (
    DeadLetter,
    Message,
    PartitionState,
    Pending,
    PendingTable,
    parse_pending_field,
    pending_field,
)

from .driver import Pair, wire

# --- in-order delivery -----------------------------------------------------------------


def test_offsets_are_delivered_in_order_per_group() -> None:
    pair = Pair()
    offsets = pair.put(None, None, None, None)
    assert pair.delivered("g", max_messages=1) == offsets[:1]
    assert pair.delivered("g", max_messages=2) == offsets[1:3]
    assert pair.delivered("g", max_messages=5) == offsets[3:]
    assert pair.delivered("g") == []


def test_offsets_start_at_one_and_increase() -> None:
    pair = Pair()
    assert pair.put(None, "k", None) == [1, 2, 3]
    assert pair.put(None) == [4]
    assert pair.leader.end == 4


def test_groups_are_independent() -> None:
    pair = Pair()
    offsets = pair.put(None, None)
    assert pair.delivered("g1") == offsets
    assert pair.delivered("g2", max_messages=1) == offsets[:1]
    pair.ack("g1", *offsets)
    assert pair.delivered("g2") == offsets[1:]
    assert not pair.leader.groups["g1"].pending
    assert set(pair.leader.groups["g2"].pending) == set(offsets)


def test_a_new_group_starts_at_the_oldest_message() -> None:
    pair = Pair()
    offsets = pair.put(None, None, None)
    assert pair.leader.plan_trim() is None  # no group yet: nothing may be trimmed
    assert pair.delivered("late", max_messages=10) == offsets


# --- pending, visibility, redelivery ---------------------------------------------------


def test_a_delivered_message_is_pending_until_acked() -> None:
    pair = Pair()
    [offset] = pair.put(None)
    [op] = pair.deliver("g", consumer="c1", visibility_ms=100, now=10)
    assert op == Deliver("g", offset, "c1", 110, 100, 1)
    assert pair.leader.groups["g"].pending == {offset: Pending("c1", 110, 100, 1)}
    assert pair.delivered("g", now=109) == []  # still invisible
    pair.ack("g", offset)
    assert pair.leader.groups["g"].pending == {}
    assert pair.delivered("g", now=10_000) == []  # acked: never again


def test_visibility_timeout_redelivers_with_count_plus_one() -> None:
    pair = Pair()
    [offset] = pair.put(None)
    pair.deliver("g", consumer="c1", visibility_ms=100, now=0)
    assert pair.deliver("g", consumer="c2", visibility_ms=50, now=99) == []
    assert pair.deliver("g", consumer="c2", visibility_ms=50, now=100) == [
        Deliver("g", offset, "c2", 150, 50, 2)
    ]
    assert pair.deliver("g", consumer="c3", visibility_ms=50, now=150, limit=5) == [
        Deliver("g", offset, "c3", 200, 50, 3)
    ]


def test_redelivery_comes_before_newer_messages() -> None:
    pair = Pair()
    first, second = pair.put(None, None)
    pair.deliver("g", max_messages=1, visibility_ms=10, now=0)
    assert pair.delivered("g", max_messages=1, now=10) == [first]
    assert pair.delivered("g", max_messages=1, now=10) == [second]


def test_nack_with_delay_makes_the_message_visible_after_the_delay() -> None:
    pair = Pair()
    [offset] = pair.put(None)
    pair.deliver("g", visibility_ms=1000, now=0)
    pair.nack("g", offset, visible_at=50)  # nacked at 20 with delay_ms 30
    assert pair.leader.groups["g"].pending[offset] == Pending("c", 50, 1000, 1)
    assert pair.delivered("g", now=49) == []
    assert pair.deliver("g", consumer="d", visibility_ms=7, now=50) == [
        Deliver("g", offset, "d", 57, 7, 2)
    ]


def test_nack_without_delay_redelivers_at_once() -> None:
    pair = Pair()
    [offset] = pair.put(None)
    pair.deliver("g", visibility_ms=1000, now=5)
    pair.nack("g", offset, visible_at=5)
    assert pair.delivered("g", now=5) == [offset]


def test_ack_or_nack_of_what_is_not_pending_changes_nothing() -> None:
    pair = Pair()
    [offset] = pair.put(None)
    pair.deliver("g")
    pair.ack("g", offset)
    pair.leader.take_writes()
    before = pair.leader.export()
    pair.ack("g", offset)
    pair.ack("nogroup", offset)
    pair.nack("g", offset, 0)
    pair.nack("nogroup", offset, 0)
    assert pair.leader.export() == before
    assert pair.leader.take_writes().empty()


# --- dead letters ----------------------------------------------------------------------


def test_dead_letters_past_the_delivery_limit() -> None:
    pair = Pair()
    [offset, other] = pair.put("k", None)
    for count in (1, 2):
        assert pair.deliver("g", max_messages=1, visibility_ms=10, now=10 * count, limit=2) == [
            Deliver("g", offset, "c", 10 * count + 10, 10, count)
        ]
    # The third delivery would pass the limit: dead instead, and the next message goes.
    assert pair.deliver("g", max_messages=1, visibility_ms=10, now=30, limit=2) == [
        Dead("g", offset, 2),
        Deliver("g", other, "c", 40, 10, 1),
    ]
    message = pair.leader.messages[offset]
    assert pair.leader.dead == [DeadLetter("g", 2, message)]
    assert offset not in pair.leader.groups["g"].pending
    assert pair.leader.lag("g") == 1  # only `other`, pending


def test_dead_letters_keep_their_order() -> None:
    pair = Pair()
    offsets = pair.put(None, None, None)
    pair.deliver("g", visibility_ms=1, now=0, limit=1)
    ops = pair.deliver("g", now=1, limit=1)
    assert ops == [Dead("g", o, 1) for o in offsets]
    assert [d.message.offset for d in pair.leader.dead] == offsets
    assert pair.leader.groups["g"].floor() == offsets[-1] + 1


def test_a_dead_message_frees_its_key() -> None:
    pair = Pair()
    first, second = pair.put("k", "k")
    pair.deliver("g", visibility_ms=1, now=0, limit=1)
    assert pair.deliver("g", visibility_ms=1, now=1, limit=1) == [
        Dead("g", first, 1), Deliver("g", second, "c", 2, 1, 1)
    ]


def test_a_dead_letter_past_next_leaves_skipped_messages_waiting() -> None:
    # Regression: Dead of a never-delivered offset advanced `next` past messages set aside
    # for key order without marking them waiting, so they were never delivered and
    # trimmed as if done. (Reachable when a consume finds a fresh message past the
    # limit, e.g. with a delivery limit of 0.)
    pair = Pair()
    first, waiting, fresh = pair.put("k", "k", None)
    assert pair.delivered("g", max_messages=1) == [first]
    assert pair.deliver("g", now=1, limit=0) == [Dead("g", fresh, 0)]
    assert pair.leader.groups["g"].waiting == {waiting}
    assert pair.leader.groups["g"].floor() == first
    pair.ack("g", first)
    pair.trim()
    assert waiting in pair.leader.messages
    assert pair.delivered("g", now=2) == [waiting]
    assert pair.follower.export() == pair.leader.export()


# --- per-key order ---------------------------------------------------------------------


def test_per_key_order_at_most_one_in_flight_per_key_per_group() -> None:
    pair = Pair()
    a1, a2, b1, n1 = pair.put("a", "a", "b", None)
    assert pair.delivered("g") == [a1, b1, n1]
    assert pair.delivered("g") == []  # a2 waits for a1
    assert pair.leader.groups["g"].waiting == {a2}
    assert pair.delivered("other") == [a1, b1, n1]  # per group
    pair.ack("g", a1)
    assert pair.delivered("g") == [a2]


def test_per_key_order_never_a_later_one_before_an_earlier_one() -> None:
    pair = Pair()
    a1, a2, a3 = pair.put("a", "a", "a")
    pair.deliver("g", visibility_ms=10, now=0)
    # a1's visibility ends: a1 again, never a2 in its place.
    assert pair.delivered("g", now=10, visibility_ms=10) == [a1]
    pair.nack("g", a1, visible_at=100)  # a1 delayed: a2 must still wait
    assert pair.delivered("g", now=50) == []
    assert pair.delivered("g", now=100) == [a1]
    pair.ack("g", a1)
    assert pair.delivered("g", now=100) == [a2]
    pair.ack("g", a2)
    assert pair.delivered("g", now=100) == [a3]


def test_per_key_waiting_messages_are_delivered_in_order_once_the_key_is_free() -> None:
    pair = Pair()
    a1, a2, n1, a3, n2 = pair.put("a", "a", None, "a", None)
    assert pair.delivered("g") == [a1, n1, n2]
    assert pair.leader.groups["g"].waiting == {a2, a3}
    pair.ack("g", a1, n1, n2)
    assert pair.delivered("g") == [a2]
    pair.ack("g", a2)
    assert pair.delivered("g") == [a3]
    assert pair.leader.groups["g"].waiting == set()
    assert pair.leader.lag("g") == 1


def test_per_key_an_empty_key_is_a_key() -> None:
    pair = Pair()
    e1, _ = pair.put("", "")
    assert pair.delivered("g") == [e1]


# --- trimming --------------------------------------------------------------------------


def test_trim_drops_messages_every_group_is_done_with() -> None:
    pair = Pair()
    o1, o2, o3 = pair.put(None, None, None)
    pair.deliver("g1")
    pair.deliver("g2", max_messages=1)
    pair.ack("g1", o1, o2)
    pair.ack("g2", o1)
    assert pair.leader.plan_trim() == Trim(o1)
    pair.trim()
    assert list(pair.leader.messages) == [o2, o3]
    assert pair.leader.trimmed == o1
    assert pair.leader.plan_trim() is None
    pair.ack("g1", o3)
    pair.deliver("g2")
    pair.ack("g2", o2, o3)
    pair.trim()
    assert pair.leader.messages == {}
    assert pair.leader.trimmed == o3
    assert len(pair.leader) == 0


def test_trim_keeps_messages_a_group_has_set_aside() -> None:
    pair = Pair()
    a1, _, n = pair.put("a", "a", None)
    pair.deliver("g")
    pair.ack("g", n)
    assert pair.leader.plan_trim() is None  # a1 pending, a2 waiting
    pair.ack("g", a1)
    assert pair.leader.plan_trim() == Trim(a1)


def test_trim_nothing_without_a_group() -> None:
    pair = Pair()
    pair.put(None, None)
    assert pair.leader.plan_trim() is None


def test_a_group_created_after_a_trim_starts_after_it() -> None:
    pair = Pair()
    o1, o2 = pair.put(None, None)
    pair.deliver("g", max_messages=1)
    pair.ack("g", o1)
    pair.trim()
    assert pair.delivered("late") == [o2]


def test_trim_is_idempotent_and_never_goes_back() -> None:
    state = PartitionState()
    for i in range(1, 4):
        state.apply(Publish(i, f"m{i}", None, "1"))
    state.apply(Trim(2))
    state.apply(Trim(1))
    state.apply(Trim(2))
    assert state.trimmed == 2
    assert list(state.messages) == [3]


# --- dedup -----------------------------------------------------------------------------


def test_dedup_by_message_id() -> None:
    pair = Pair()
    [first] = pair.publish(("x", None, "1"))
    assert not first.duplicate
    again, other = pair.publish(("x", "k", "2"), ("y", None, "3"))
    assert again.duplicate and again.offset == first.offset
    assert not other.duplicate and other.offset == first.offset + 1
    assert [m.id for m in pair.leader.messages.values()] == ["x", "y"]


def test_dedup_within_one_batch() -> None:
    pair = Pair()
    results = pair.publish(("x", None, "1"), ("x", None, "2"), ("y", None, "3"))
    assert [(r.offset, r.duplicate) for r in results] == [(1, False), (1, True), (2, False)]
    assert len(pair.leader) == 2


def test_dedup_outlives_a_trim() -> None:
    pair = Pair()
    [r] = pair.publish(("x", None, "1"))
    pair.deliver("g")
    pair.ack("g", r.offset)
    pair.trim()
    [again] = pair.publish(("x", None, "1"))
    assert again.duplicate and again.offset == r.offset
    assert len(pair.leader) == 0


def test_dedup_window_is_bounded() -> None:
    pair = Pair(max_ids=2)
    pair.publish(("a", None, "1"), ("b", None, "1"), ("c", None, "1"))
    assert list(pair.leader.ids) == ["b", "c"]
    [b, a] = pair.publish(("b", None, "2"), ("a", None, "2"))
    assert b.duplicate and not a.duplicate and a.offset == 4
    assert list(pair.leader.ids) == ["c", "a"]
    assert pair.follower.export() == pair.leader.export()


def test_a_resent_publish_op_is_applied_once() -> None:
    state = PartitionState()
    op = Publish(1, "x", None, "1")
    state.apply(op)
    state.take_writes()
    state.apply(op)
    assert len(state) == 1 and state.take_writes().empty()


# --- leadership change -----------------------------------------------------------------


def test_rebase_restarts_every_visibility_on_the_new_clock() -> None:
    pair = Pair()
    o1, o2 = pair.put(None, None)
    pair.deliver("g", max_messages=1, visibility_ms=100, now=1_000_000)
    pair.deliver("h", max_messages=2, visibility_ms=7, now=1_000_000)
    pair.rebase(5)
    assert pair.leader.groups["g"].pending == {o1: Pending("c", 105, 100, 1)}
    assert pair.leader.groups["h"].pending == {o1: Pending("c", 12, 7, 1),
                                               o2: Pending("c", 12, 7, 1)}
    assert pair.leader.next_visible_after("h", 0) == 12
    assert pair.leader.next_visible_after("g", 0) == 105
    assert pair.leader.next_visible_after("g", 105) is None  # visible by then
    assert pair.leader.next_visible_after("nobody", 0) is None


# --- queries ---------------------------------------------------------------------------


def test_lag_and_pending_count() -> None:
    pair = Pair()
    pair.put("a", "a", None)
    assert pair.leader.lag("g") == 3
    pair.deliver("g")
    assert pair.leader.lag("g") == 3 and pair.leader.pending_count() == 2
    pair.ack("g", 1, 3)
    assert pair.leader.lag("g") == 1 and pair.leader.pending_count() == 0
    assert pair.leader.next_visible_after("g", 0) is None


# --- encoding, writes, export ----------------------------------------------------------

ALL_OPS = [
    Publish(1, "id", None, '{"a":1}'),
    Publish(2, "id|2", "k", "null"),
    Deliver("g", 1, "c|x", 100, 50, 2),
    Ack("g", 1),
    Nack("g", 1, 7),
    Dead("g", 1, 3),
    Trim(4),
    Rebase(123),
]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: type(op).__name__)
def test_ops_survive_the_wire(op: object) -> None:
    assert wire(op) == op  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    [None, [], "p", [1], ["?"], ["a", "g"], ["a", "g", 1, 2], ["a", "g", "1"], ["a", "g", True],
     ["p", 1, "id", 5, "b"], ["t", 1.5], {"t": 1}, ["d", "g", 1, "c", 1, 1, None]],
)
def test_malformed_ops_are_refused(raw: object) -> None:
    with pytest.raises(OpDecodeError):
        decode_op(raw)


def test_pending_field_round_trip_with_separator_in_consumer() -> None:
    p = Pending("a|b|c", 10, 20, 3)
    assert parse_pending_field(pending_field(p)) == p


def test_take_writes_lists_what_changed_once() -> None:
    pair = Pair(max_ids=1)
    pair.put("k", "k", None)
    writes = pair.leader.take_writes()
    assert [m.offset for m in writes.messages] == [1, 2, 3]
    assert writes.ids == {"m0-0": None, "m0-1": None, "m0-2": 3}
    pair.deliver("g", now=0, visibility_ms=5)
    writes = pair.leader.take_writes()
    assert writes.group_fields == {("g", "next"): "4", ("g", "p:1"): "5|5|1|c",
                                   ("g", "p:3"): "5|5|1|c", ("g", "w:2"): "1"}
    pair.ack("g", 1, 3)
    pair.deliver("g", now=0, visibility_ms=5)
    writes = pair.leader.take_writes()
    assert writes.group_fields == {("g", "p:1"): None, ("g", "p:3"): None,
                                   ("g", "p:2"): "5|5|1|c", ("g", "w:2"): None}
    pair.ack("g", 2)
    pair.trim()
    writes = pair.leader.take_writes()
    assert writes.trim_upto == 3
    assert pair.leader.take_writes().empty()


def test_export_round_trip() -> None:
    pair = Pair()
    pair.put("a", "a", None, "b")
    pair.deliver("g", visibility_ms=1, now=0, limit=1)
    pair.deliver("g", now=1, limit=1)
    pair.deliver("h", max_messages=1)
    data = pair.leader.export()
    again = PartitionState.from_export(data)
    assert again.export() == data
    assert again.dead == pair.leader.dead
    assert isinstance(again.dead[0].message, Message)


# --- randomized: leader, follower, and the rules after every step ----------------------

GROUPS = ("g1", "g2", "g3")
CONSUMERS = ("c1", "c2", "c|3")
KEYS = (None, None, "a", "b", "c", "")


@dataclass
class Model:
    """What the test knows from the ops it planned, independently of the state."""

    published: dict[int, Message] = field(default_factory=dict)
    # group -> first offset it may see (the oldest message when it was created)
    start: dict[str, int] = field(default_factory=dict)
    done: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    first_delivered: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    dead: list[tuple[str, int]] = field(default_factory=list)
    receipts: list[tuple[str, int, int]] = field(default_factory=list)  # group, offset, count


class Run:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.max_ids = self.rng.choice([4, 10, 100_000])
        self.limit = self.rng.choice([1, 2, 3, 5])  # the delivery limit
        self.pair = Pair(max_ids=self.max_ids)
        self.model = Model()
        self.now = 0
        self.fresh = 0

    @property
    def state(self) -> PartitionState:
        return self.pair.leader

    # --- steps ---------------------------------------------------------------------------

    def publish(self) -> None:
        items: list[tuple[str, str | None, str]] = []
        for _ in range(self.rng.randint(1, 4)):
            roll = self.rng.random()
            if roll < 0.3 and self.model.published:
                message_id = self.model.published[
                    self.rng.choice(list(self.model.published))
                ].id  # a re-sent publish
            elif roll < 0.4 and items:
                message_id = items[-1][0]  # twice in one batch
            else:
                self.fresh += 1
                message_id = f"id-{self.fresh}"
            key = self.rng.choice(KEYS)
            items.append((message_id, key, f'{{"n":{self.rng.randrange(100)}}}'))
        window = dict(self.state.ids)
        end = self.state.end
        ops, results = self.state.plan_publish(items)
        self.pair.apply(ops)
        batch: dict[str, int] = {}
        for (message_id, key, body), result in zip(items, results, strict=True):
            seen = window.get(message_id, batch.get(message_id))
            if seen is not None:
                assert result.duplicate and result.offset == seen
                continue
            assert not result.duplicate and result.offset == end + len(batch) + 1
            batch[message_id] = result.offset
            self.model.published[result.offset] = Message(result.offset, message_id, key, body)
        assert [op.offset for op in ops] == sorted(batch.values())

    def consume(self, group: str, consumer: str, max_messages: int, visibility_ms: int) -> None:
        if group not in self.state.groups:
            self.model.start[group] = self.state.trimmed + 1
        ops = self.state.plan_deliver(group, consumer, max_messages, visibility_ms, self.now,
                                      self.limit)
        assert len([op for op in ops if isinstance(op, Deliver)]) <= max_messages
        for op in ops:
            self.check_delivery_allowed(op)
            self.pair.apply([op])
            if isinstance(op, Dead):
                self.model.done[group].add(op.offset)
                self.model.dead.append((group, op.offset))
            else:
                assert op.visible_at == self.now + visibility_ms and op.consumer == consumer
                self.model.receipts.append((group, op.offset, op.count))

    def check_delivery_allowed(self, op: Deliver | Dead) -> None:
        """Before op is applied: it obeys the rules given what happened so far."""
        g = self.state.groups.get(op.group)
        pending = g.pending.get(op.offset) if g is not None else None
        message = self.model.published[op.offset]
        done = self.model.done[op.group]
        assert op.offset not in done, f"{op} of a finished message"
        assert op.offset >= self.model.start[op.group]
        if pending is not None:
            assert pending.visible_at <= self.now, f"{op} while still invisible"
        count = (pending.count if pending is not None else 0) + 1
        if isinstance(op, Dead):
            assert op.count == count - 1 and count > self.limit
            return
        assert op.count == count <= self.limit
        if pending is None:
            first = self.model.first_delivered[op.group]
            assert op.offset not in first
            first.append(op.offset)
        if message.key is not None:
            for earlier, m in self.model.published.items():
                if m.key == message.key and self.model.start[op.group] <= earlier < op.offset:
                    assert earlier in done, (
                        f"{op} (key {message.key!r}) before earlier {earlier} is done"
                    )
        else:
            # Keyless messages go out in offset order.
            for earlier, m in self.model.published.items():
                if (m.key is None and self.model.start[op.group] <= earlier < op.offset):
                    assert earlier in done or earlier in self.model.first_delivered[op.group]

    def settle(self) -> None:
        if not self.model.receipts:
            return
        group, offset, count = self.model.receipts.pop(
            self.rng.randrange(len(self.model.receipts))
        )
        g = self.state.groups[group]
        pending = g.pending.get(offset)
        if pending is None:
            # Already acked or dead: the op (if someone sends it) changes nothing.
            before = self.state.export()
            noop: list[Op] = [Ack(group, offset), Nack(group, offset, 0)]
            self.pair.apply([self.rng.choice(noop)])
            assert self.state.export() == before
            return
        if pending.count != count:
            return  # a stale receipt: the service answers not_pending, no op
        if self.rng.random() < 0.75:
            self.pair.ack(group, offset)
            self.model.done[group].add(offset)
        else:
            self.pair.nack(group, offset, self.now + self.rng.choice([0, 0, 5, 40]))
            self.model.receipts.append((group, offset, count))  # may be acked later: stale

    def trim(self) -> None:
        before = self.state.trimmed
        trim = self.state.plan_trim()
        if trim is not None:
            assert trim.upto > before
            self.pair.apply([trim])

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.3:
            self.publish()
        elif roll < 0.6:
            self.consume(self.rng.choice(GROUPS), self.rng.choice(CONSUMERS),
                         self.rng.randint(1, 4), self.rng.choice([0, 5, 20, 60]))
        elif roll < 0.82:
            self.settle()
        elif roll < 0.92:
            self.now += self.rng.randint(1, 25)
        elif roll < 0.98:
            self.trim()
        else:
            self.pair.rebase(self.now)
            for g in self.state.groups.values():
                for p in g.pending.values():
                    assert p.visible_at == self.now + p.visibility_ms

    def drain(self) -> None:
        """Consumers that ack everything: every message ends acked or dead. The earlier
        consumers are gone (their receipts dropped): what they held comes back through
        redelivery."""
        self.model.receipts.clear()
        for _ in range(500):
            self.now += 100
            for group in self.model.start:
                self.consume(group, "drainer", 50, 10)
                for group_, offset, count in self.model.receipts:
                    g = self.state.groups[group_]
                    pending = g.pending.get(offset)
                    if pending is not None and pending.count == count:
                        self.pair.ack(group_, offset)
                        self.model.done[group_].add(offset)
                self.model.receipts.clear()
                self.check()
            if all(self.state.lag(g) == 0 for g in self.model.start):
                break
        for group, start in self.model.start.items():
            expected = {o for o in self.model.published if o >= start}
            assert self.model.done[group] == expected, f"group {group} not finished"
            assert self.state.lag(group) == 0
        self.trim()
        if self.model.start:
            assert self.state.messages == {}
            assert self.state.trimmed == self.state.end
        self.check()

    # --- invariants --------------------------------------------------------------------

    def check(self) -> None:
        state = self.state
        exported = state.export()
        assert self.pair.follower.export() == exported
        # The state holds exactly the published messages not yet trimmed.
        assert state.messages == {
            o: m for o, m in self.model.published.items() if o > state.trimmed
        }
        assert state.end == max(self.model.published, default=0)
        # No message id is stored twice within the dedup window.
        assert len(state.ids) <= self.max_ids
        by_id: dict[str, list[int]] = defaultdict(list)
        for o, m in self.model.published.items():
            by_id[m.id].append(o)
        for message_id, offsets in by_id.items():
            for a, b in itertools.pairwise(offsets):
                assert b - a > self.max_ids, f"id {message_id!r} stored at {a} and {b}"
        for message_id, o in state.ids.items():
            assert self.model.published[o].id == message_id
        assert list(state.ids.values()) == sorted(state.ids.values())
        for name, g in state.groups.items():
            done = self.model.done[name]
            # Per group and key: never two in flight (nor pending at all: a later one
            # goes only once the earlier ones are done).
            keys = [self.model.published[o].key for o in g.pending]
            keys = [k for k in keys if k is not None]
            assert len(keys) == len(set(keys)), f"group {name}: two pending of one key"
            assert not (set(g.pending) & done) and not (g.waiting & done)
            assert not (set(g.pending) & g.waiting)
            assert all(o < g.next for o in [*g.pending, *g.waiting])
            # Everything below the floor is done; trimmed ones too.
            floor = g.floor()
            assert all(o in done for o in self.model.published
                       if self.model.start[name] <= o < floor)
            assert all(o in done for o in self.model.published
                       if self.model.start[name] <= o <= state.trimmed)
            # Everything the group was handed and is not done is pending or waiting.
            for o in range(self.model.start[name], g.next):
                if o not in done and o in self.model.published:
                    assert o in g.pending or o in g.waiting, f"group {name} lost {o}"
            assert state.lag(name) == len(
                [o for o in self.model.published if o >= self.model.start[name] and o not in done]
            )
        assert [(d.group, d.message.offset) for d in state.dead] == self.model.dead
        # A long poll sleeps while may_deliver is False, until next_visible_after: if a
        # consume could deliver now, may_deliver must say so; if not, nothing may become
        # deliverable before next_visible_after without an op (a publish, an ack, ...).
        for group in (*GROUPS, "new"):
            planned = state.plan_deliver(group, "c", 3, 10, self.now, self.limit)
            may = state.may_deliver(group, self.now, self.limit)
            assert may == bool(planned), f"group {group}: {may} but {planned}"
            if not may:
                wake = state.next_visible_after(group, self.now)
                for later in (self.now + 1, self.now + 9, self.now + 30):
                    if wake is None or later < wake:
                        assert not [op for op in state.plan_deliver(
                            group, "c", 3, 10, later, self.limit) if isinstance(op, Deliver)
                        ], f"group {group}: deliverable at {later} before the wake-up {wake}"
        # A state rebuilt from the export is the same state and decides the same.
        rebuilt = PartitionState.from_export(exported, self.max_ids)
        assert rebuilt.export() == exported
        assert rebuilt.plan_trim() == state.plan_trim()
        for group in (*GROUPS, "new"):
            for now in (self.now, self.now + 30):
                assert rebuilt.plan_deliver(group, "c", 3, 10, now, self.limit) == (
                    state.plan_deliver(group, "c", 3, 10, now, self.limit)
                )
        assert rebuilt.plan_publish([("id-1", None, "x"), ("zz", "a", "y")]) == (
            state.plan_publish([("id-1", None, "x"), ("zz", "a", "y")])
        )


@pytest.mark.parametrize("seed", range(200))
def test_randomized_leader_and_follower(seed: int) -> None:
    run = Run(seed)
    try:
        for _ in range(run.rng.randint(20, 120)):
            run.step()
            run.check()
        run.drain()
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc


# --- pending deliveries: found by time, not by a scan ----------------------------------------


def test_pending_table_finds_visible_deliveries_like_a_scan() -> None:
    for seed in range(50):
        rng = random.Random(seed)
        table = PendingTable()
        plain: dict[int, Pending] = {}
        now = 0
        for _ in range(400):
            roll = rng.random()
            offset = rng.randrange(60)
            if roll < 0.5:
                p = Pending("c", now + rng.choice((-5, 0, 1, 10, 50)), 10, rng.randrange(1, 4))
                table[offset] = p
                plain[offset] = p
            elif roll < 0.7:
                assert table.pop(offset, None) == plain.pop(offset, None)
            elif roll < 0.75 and offset in plain:
                del table[offset]
                del plain[offset]
            else:
                now += rng.choice((0, 1, 7, 30))
            expected = sorted(o for o, p in plain.items() if p.visible_at <= now)
            assert list(table.visible(now)) == expected, f"seed {seed}"
            earliest = min((p.visible_at for p in plain.values()), default=None)
            assert table.earliest() == earliest, f"seed {seed}"
            later = min((p.visible_at for p in plain.values() if p.visible_at > now),
                        default=None)
            assert table.next_visible_after(now) == later, f"seed {seed}"
            assert dict(table) == plain
        assert len(table._heap) <= 2 * len(table) + 65  # stale heap entries are bounded


def test_pending_table_lists_a_visible_delivery_once_even_if_assigned_twice_alike() -> None:
    table = PendingTable()
    table[3] = Pending("c", 10, 10, 1)
    table[3] = Pending("c", 10, 10, 1)  # the same assignment again: two heap entries
    assert list(table.visible(10)) == [3] and list(table.visible(11)) == [3]
    table.pop(3)
    assert list(table.visible(20)) == []


def test_a_consume_with_many_unacked_deliveries_does_not_walk_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each consume used to walk every pending delivery twice (to find the visible ones
    # and the keys in flight): with 33,000 unacked per partition a consume took tens of
    # milliseconds and 200,000 unacked messages took minutes to hand out.
    state = PartitionState()
    for i in range(1, 20_001):
        state.apply(Publish(i, f"id{i}", "k" if i == 7 else None, '"x"'))
    for i in range(1, 20_001):
        state.apply(Deliver("g", i, "c", 1_000 + i, 30_000, 1))
    state.apply(Publish(20_001, "keyed", "k", '"y"'))
    state.apply(Publish(20_002, "other", "j", '"z"'))
    # The first consume that meets a key indexes the group's pending keys, once.
    assert [op.offset for op in state.plan_deliver("g", "c", 3, 30_000, 1_002, 5)] == [
        1,
        2,
        20_002,  # 20,001 waits: 7 (key k) is still invisible
    ]

    def no_walk(*_: object) -> None:
        raise AssertionError("a consume walked every pending delivery")

    for method in ("__iter__", "items", "values", "keys"):
        monkeypatch.setattr(PendingTable, method, no_walk)
    ops = state.plan_deliver("g", "c", 10, 30_000, now=1_010, delivery_limit=5)
    # 1-10 are visible again except 7, whose key k keeps 20,001 waiting too.
    assert [op.offset for op in ops] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    ops = state.plan_deliver("g", "c", 10, 30_000, now=1_006, delivery_limit=5)
    assert [op.offset for op in ops] == [1, 2, 3, 4, 5, 6, 20_002]
