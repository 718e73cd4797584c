"""One queue partition as a deterministic state machine: messages, consumer groups,
deliveries, dead letters. No I/O and no clock: time arrives inside ops and arguments.

Two kinds of methods:
- `apply(op)` mutates; every replica applies the same ops in the same order.
- `plan_*` (leader only) decide what should happen and return the ops, without mutating;
  the leader applies them like any replica and ships them to the others.

Delivery rules (per consumer group):
- Offsets are delivered in order. A delivered message is pending until acked; when its
  visibility ends (or it is nacked) it is delivered again, with its count increased.
- A message whose next delivery would pass the delivery limit is moved to the dead
  letters instead.
- Per-key order: at most one message of a key is in flight per group, and never a later
  one before an earlier one. A new message whose key is busy is set aside ("waiting")
  and delivered, in order, once the key is free.
- Messages every group is done with are trimmed. With no group yet, nothing is trimmed:
  the first group starts at the oldest message.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from service.queue.ops import Ack, Dead, Deliver, Nack, Op, Publish, Rebase, Trim

DEFAULT_MAX_IDS = 100_000
MAX_DEAD_KEPT = 10_000
# A consume looks at no more than this many candidates: a hot key must not make every
# consume scan the whole backlog.
MAX_SCAN = 2_000


@dataclass(frozen=True, slots=True)
class Message:
    offset: int
    id: str
    key: str | None
    body: str


@dataclass(frozen=True, slots=True)
class Pending:
    consumer: str
    visible_at: int
    visibility_ms: int
    count: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    group: str
    count: int
    message: Message


class PendingTable(dict[int, Pending]):
    """A group's pending deliveries (offset -> Pending) that also finds, without a scan,
    the ones whose visibility has ended: a consume used to walk (and sort) every pending
    delivery, so with tens of thousands unacked each consume cost milliseconds.

    A min-heap of (visible_at, offset) holds an entry per assignment; entries made stale
    by a later assignment or a removal are skipped when they surface. Offsets popped
    from it as visible move to `_visible`, kept sorted, until assigned again or removed.
    """

    def __init__(self, items: Iterable[tuple[int, Pending]] = ()) -> None:
        super().__init__()
        self._heap: list[tuple[int, int]] = []
        self._visible: list[int] = []  # ascending
        dict.update(self, items)  # in bulk: one heapify, not a push per delivery
        self._compact()

    def __setitem__(self, offset: int, pending: Pending) -> None:
        super().__setitem__(offset, pending)
        self._unlist(offset)
        heapq.heappush(self._heap, (pending.visible_at, offset))
        if len(self._heap) > 2 * len(self) + 64:
            self._compact()

    def __delitem__(self, offset: int) -> None:
        super().__delitem__(offset)
        self._unlist(offset)

    def pop(self, offset: int, default: Any = None) -> Any:
        self._unlist(offset)
        return super().pop(offset, default)

    def visible(self, now: int) -> Iterator[int]:
        """Offsets whose visibility ended by `now`, ascending (lazily: a consume takes
        the first few). The table must not change while this is iterated."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            visible_at, offset = heapq.heappop(heap)
            current = self.get(offset)
            if current is not None and current.visible_at == visible_at:
                self._list(offset)  # (an equal assignment may have pushed it twice)
        return (o for o in self._visible if self[o].visible_at <= now)

    def earliest(self) -> int | None:
        """The earliest visible_at of any pending delivery."""
        times = [self[o].visible_at for o in self._visible]
        top = self._heap_top()
        if top is not None:
            times.append(top)
        return min(times, default=None)

    def next_visible_after(self, now: int) -> int | None:
        """When the next pending delivery still invisible at `now` becomes visible (a
        long poll's wake-up time)."""
        self.visible(now)  # lists those visible by now: the heap keeps only later ones
        # Listed ones are visible by the latest time asked, which may be later than now.
        times = [t for o in self._visible if (t := self[o].visible_at) > now]
        top = self._heap_top()
        if top is not None:
            times.append(top)
        return min(times, default=None)

    def _heap_top(self) -> int | None:
        """The heap's earliest visible_at, dropping the stale entries that surface."""
        heap = self._heap
        while heap:
            visible_at, offset = heap[0]
            current = self.get(offset)
            if current is not None and current.visible_at == visible_at:
                return visible_at
            heapq.heappop(heap)
        return None

    def _list(self, offset: int) -> None:
        visible = self._visible
        i = bisect_left(visible, offset)
        if i == len(visible) or visible[i] != offset:
            visible.insert(i, offset)

    def _unlist(self, offset: int) -> None:
        visible = self._visible
        if visible:
            i = bisect_left(visible, offset)
            if i < len(visible) and visible[i] == offset:
                del visible[i]

    def _compact(self) -> None:
        listed = set(self._visible)
        self._heap = [(p.visible_at, o) for o, p in self.items() if o not in listed]
        heapq.heapify(self._heap)


@dataclass(slots=True)
class Group:
    next: int  # the next offset never handed to this group
    pending: PendingTable = field(default_factory=PendingTable)
    waiting: set[int] = field(default_factory=set)  # set aside for key order, < next
    # key -> its pending offsets; built by the first consume that needs it, then kept
    keyed: dict[str, set[int]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pending, PendingTable):
            self.pending = PendingTable(self.pending.items())

    def floor(self) -> int:
        """Every offset below this is done (acked or dead) in this group."""
        undone = [*self.pending, *self.waiting]
        return min(undone) if undone else self.next


@dataclass(slots=True)
class Writes:
    """What changed since the last `take_writes`, for the store (one transaction)."""

    messages: list[Message] = field(default_factory=list)
    trim_upto: int | None = None
    dead: list[DeadLetter] = field(default_factory=list)
    # (group, field) -> value, or None to delete the field
    group_fields: dict[tuple[str, str], str | None] = field(default_factory=dict)
    ids: dict[str, int | None] = field(default_factory=dict)

    def merge(self, later: Writes) -> None:
        """Fold a later batch into this one (for a retried save)."""
        self.messages.extend(later.messages)
        if later.trim_upto is not None:
            self.trim_upto = max(self.trim_upto or 0, later.trim_upto)
        self.dead.extend(later.dead)
        self.group_fields.update(later.group_fields)
        self.ids.update(later.ids)

    def empty(self) -> bool:
        return not (
            self.messages or self.trim_upto is not None or self.dead or self.group_fields
            or self.ids
        )


@dataclass(frozen=True, slots=True)
class PublishResult:
    offset: int
    id: str
    duplicate: bool


class PartitionState:
    def __init__(self, max_ids: int = DEFAULT_MAX_IDS) -> None:
        self.max_ids = max_ids
        self.messages: dict[int, Message] = {}  # insertion order is offset order
        self.end = 0  # last offset ever published
        self.trimmed = 0  # offsets <= trimmed were dropped
        self.ids: dict[str, int] = {}  # message id -> offset, oldest first (dedup window)
        self.groups: dict[str, Group] = {}
        self.dead: list[DeadLetter] = []
        self._writes = Writes()

    # --- queries -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.messages)

    def pending_count(self) -> int:
        """Deliveries not yet acked, over all groups."""
        return sum(len(g.pending) for g in self.groups.values())

    def lag(self, group: str) -> int:
        """Messages this group has not finished (never delivered, set aside or pending)."""
        g = self.groups.get(group)
        if g is None:
            return len(self.messages)
        return (self.end - g.next + 1) + len(g.waiting) + len(g.pending)

    # --- leader decisions --------------------------------------------------------------

    def plan_publish(
        self, items: Iterable[tuple[str, str | None, str]]
    ) -> tuple[list[Publish], list[PublishResult]]:
        """(id, key, body) per message -> the ops to append and each message's result.
        An id already accepted (in this partition's dedup window, or earlier in the same
        batch) is a duplicate: not stored again, answered with the first offset."""
        ops: list[Publish] = []
        results: list[PublishResult] = []
        batch: dict[str, int] = {}
        offset = self.end
        for message_id, key, body in items:
            seen = self.ids.get(message_id, batch.get(message_id))
            if seen is not None:
                results.append(PublishResult(seen, message_id, True))
                continue
            offset += 1
            batch[message_id] = offset
            ops.append(Publish(offset, message_id, key, body))
            results.append(PublishResult(offset, message_id, False))
        return ops, results

    def plan_deliver(
        self,
        group: str,
        consumer: str,
        max_messages: int,
        visibility_ms: int,
        now: int,
        delivery_limit: int,
    ) -> list[Deliver | Dead]:
        """Up to max_messages deliveries for consumer, plus dead-letter moves for
        messages found past the limit on the way."""
        g = self.groups.get(group)
        if g is None:
            g = Group(self._first_offset())
        in_flight: set[str] = set()  # keys delivered by this plan
        ops: list[Deliver | Dead] = []
        delivered = 0
        for offset in itertools.islice(self._candidates(g, now), MAX_SCAN):
            if delivered >= max_messages:
                break
            message = self.messages.get(offset)
            if message is None:
                continue
            pending = g.pending.get(offset)
            count = (pending.count if pending is not None else 0) + 1
            if message.key is not None and (
                message.key in in_flight or self._key_in_flight(g, message.key, now)
            ):
                continue  # an earlier message of this key is in flight
            if count > delivery_limit:
                ops.append(Dead(group, offset, count - 1))
                continue
            if message.key is not None:
                in_flight.add(message.key)
            ops.append(Deliver(group, offset, consumer, now + visibility_ms, visibility_ms, count))
            delivered += 1
        return ops

    def plan_trim(self) -> Trim | None:
        if not self.groups:
            return None
        upto = min(g.floor() for g in self.groups.values()) - 1
        return Trim(upto) if upto > self.trimmed else None

    def next_visible_after(self, group: str, now: int) -> int | None:
        """When a delivery to `group` still invisible at `now` becomes visible again
        (its visibility or a nack's delay ends): when a long poll should look again."""
        g = self.groups.get(group)
        return None if g is None else g.pending.next_visible_after(now)

    def may_deliver(self, group: str, now: int, delivery_limit: int) -> bool:
        """Whether a consume by `group` would get something now (or move a message past
        the delivery limit to the dead letters). False when all there is waits for a
        visibility to end or for an earlier message of its key to be acked."""
        return bool(self.plan_deliver(group, "", 1, 1, now, delivery_limit))

    # --- applying ops ------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        match op:
            case Publish():
                self._publish(op)
            case Deliver():
                self._deliver(op)
            case Ack():
                self._ack(op.group, op.offset)
            case Nack():
                self._nack(op)
            case Dead():
                self._dead(op)
            case Trim():
                self._trim(op.upto)
            case Rebase():
                self._rebase(op.now)

    def take_writes(self) -> Writes:
        writes, self._writes = self._writes, Writes()
        return writes

    # --- whole-state transfer (new replica, divergent replica, restart) ----------------

    def export(self) -> dict[str, Any]:
        return {
            "end": self.end,
            "trimmed": self.trimmed,
            "messages": [[m.offset, m.id, m.key, m.body] for m in self.messages.values()],
            "ids": [[i, o] for i, o in self.ids.items()],
            "groups": {
                name: {
                    "next": g.next,
                    "pending": [
                        [o, p.consumer, p.visible_at, p.visibility_ms, p.count]
                        for o, p in sorted(g.pending.items())
                    ],
                    "waiting": sorted(g.waiting),
                }
                for name, g in sorted(self.groups.items())
            },
            "dead": [
                [d.group, d.count, d.message.offset, d.message.id, d.message.key, d.message.body]
                for d in self.dead
            ],
        }

    @classmethod
    def from_export(cls, data: dict[str, Any], max_ids: int = DEFAULT_MAX_IDS) -> PartitionState:
        state = cls(max_ids)
        state.end = int(data["end"])
        state.trimmed = int(data["trimmed"])
        state.messages = {int(m[0]): Message(int(m[0]), m[1], m[2], m[3]) for m in data["messages"]}
        state.ids = {str(i): int(o) for i, o in data["ids"]}
        for name, g in data["groups"].items():
            state.groups[str(name)] = Group(
                int(g["next"]),
                PendingTable(
                    (int(o), Pending(c, int(v), int(vm), int(n)))
                    for o, c, v, vm, n in g["pending"]
                ),
                {int(o) for o in g["waiting"]},
            )
        state.dead = [
            DeadLetter(grp, int(n), Message(int(o), i, k, b)) for grp, n, o, i, k, b in data["dead"]
        ]
        return state

    # --- internals ---------------------------------------------------------------------

    def _first_offset(self) -> int:
        return self.trimmed + 1

    def _candidates(self, g: Group, now: int) -> Iterator[int]:
        """Offsets that could be delivered now, ascending: redeliverable pending ones,
        ones set aside for key order, then never-delivered ones."""
        visible = g.pending.visible(now)
        waiting = sorted(g.waiting)
        fresh = range(max(g.next, self._first_offset()), self.end + 1)
        yield from heapq.merge(visible, waiting, fresh)

    def _key_in_flight(self, g: Group, key: str, now: int) -> bool:
        """Whether a delivery of `key` is pending and still invisible in group `g`."""
        if g.keyed is None:
            g.keyed = {}
            for offset in g.pending:
                self._note_pending_key(g, offset)
        return any(g.pending[o].visible_at > now for o in g.keyed.get(key, ()))

    def _note_pending_key(self, g: Group, offset: int) -> None:
        if g.keyed is None:
            return  # not indexed yet (never, in a group that only saw keyless messages)
        message = self.messages.get(offset)
        if message is not None and message.key is not None:
            g.keyed.setdefault(message.key, set()).add(offset)

    def _forget_pending_key(self, g: Group, offset: int) -> None:
        if g.keyed is None:
            return
        message = self.messages.get(offset)
        if message is not None and message.key is not None:
            offsets = g.keyed.get(message.key)
            if offsets is not None:
                offsets.discard(offset)
                if not offsets:
                    del g.keyed[message.key]

    def _group(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            g = Group(self._first_offset())
            self.groups[name] = g
            self._set(name, "next", str(g.next))
        return g

    def _set(self, group: str, field_name: str, value: str | None) -> None:
        self._writes.group_fields[(group, field_name)] = value

    def _publish(self, op: Publish) -> None:
        if op.offset <= self.end:
            return  # already applied (a resent batch)
        message = Message(op.offset, op.id, op.key, op.body)
        self.messages[op.offset] = message
        self.end = op.offset
        self.ids[op.id] = op.offset
        self._writes.messages.append(message)
        self._writes.ids[op.id] = op.offset
        while len(self.ids) > self.max_ids:
            oldest = next(iter(self.ids))
            del self.ids[oldest]
            self._writes.ids[oldest] = None

    def _deliver(self, op: Deliver) -> None:
        g = self._group(op.group)
        g.pending[op.offset] = Pending(op.consumer, op.visible_at, op.visibility_ms, op.count)
        self._note_pending_key(g, op.offset)
        self._set(op.group, f"p:{op.offset}", pending_field(g.pending[op.offset]))
        if op.offset in g.waiting:
            g.waiting.discard(op.offset)
            self._set(op.group, f"w:{op.offset}", None)
        self._pass(op.group, g, op.offset)

    def _pass(self, name: str, g: Group, offset: int) -> None:
        """`offset` was handed to the group (delivered or dead-lettered): move `next` past
        it. Everything skipped on the way waits for its key to free up, whichever op
        skipped it; otherwise it would be neither delivered nor counted as undone."""
        if offset < g.next:
            return
        for skipped in range(g.next, offset):
            if skipped in self.messages and skipped not in g.pending:
                g.waiting.add(skipped)
                self._set(name, f"w:{skipped}", "1")
        g.next = offset + 1
        self._set(name, "next", str(g.next))

    def _ack(self, group: str, offset: int) -> None:
        g = self.groups.get(group)
        if g is not None and g.pending.pop(offset, None) is not None:
            self._forget_pending_key(g, offset)
            self._set(group, f"p:{offset}", None)

    def _nack(self, op: Nack) -> None:
        g = self.groups.get(op.group)
        pending = g.pending.get(op.offset) if g is not None else None
        if g is None or pending is None:
            return
        g.pending[op.offset] = Pending(
            pending.consumer, op.visible_at, pending.visibility_ms, pending.count
        )
        self._set(op.group, f"p:{op.offset}", pending_field(g.pending[op.offset]))

    def _dead(self, op: Dead) -> None:
        g = self._group(op.group)
        message = self.messages.get(op.offset)
        if g.pending.pop(op.offset, None) is not None:
            self._forget_pending_key(g, op.offset)
        self._set(op.group, f"p:{op.offset}", None)
        if op.offset in g.waiting:
            g.waiting.discard(op.offset)
            self._set(op.group, f"w:{op.offset}", None)
        self._pass(op.group, g, op.offset)
        if message is not None:
            letter = DeadLetter(op.group, op.count, message)
            self.dead.append(letter)
            self._writes.dead.append(letter)
            if len(self.dead) > MAX_DEAD_KEPT:
                del self.dead[: len(self.dead) - MAX_DEAD_KEPT]

    def _trim(self, upto: int) -> None:
        if upto <= self.trimmed:
            return
        # Offset order is insertion order: stop at the first one kept.
        done = list(itertools.takewhile(lambda o: o <= upto, self.messages))
        for offset in done:
            del self.messages[offset]
        self.trimmed = upto
        self._writes.trim_upto = upto

    def _rebase(self, now: int) -> None:
        for name, g in self.groups.items():
            for offset, p in g.pending.items():
                g.pending[offset] = Pending(
                    p.consumer, now + p.visibility_ms, p.visibility_ms, p.count
                )
                self._set(name, f"p:{offset}", pending_field(g.pending[offset]))


def pending_field(p: Pending) -> str:
    # The consumer goes last: it is free text and may contain the separator.
    return f"{p.visible_at}|{p.visibility_ms}|{p.count}|{p.consumer}"


def parse_pending_field(value: str) -> Pending:
    visible_at, visibility_ms, count, consumer = value.split("|", 3)
    return Pending(consumer, int(visible_at), int(visibility_ms), int(count))
