"""The lock table: holders, FIFO waiters, fencing tokens, leases and the wait-for graph.

Pure and deterministic: every method takes the Raft log index and the proposing
leader's clock (`now_ms`) as arguments, never reads a clock, never does I/O and never
iterates a set or dict whose order could differ between replicas (outputs that depend
on an order use sorted or FIFO order). Inputs are assumed valid (the machine parses and
validates raw commands); rule violations are returned as outcomes, never raised.

Rules, in one place:
- A lock is held by one exclusive holder or by any number of shared holders.
- An acquire is granted at once only if compatible with the holders AND nobody waits
  (so an exclusive waiter blocks later shared requests: no writer starvation).
- When holders leave, the head of the queue is granted: one exclusive waiter, or the
  longest run of consecutive shared waiters. Hence an invariant: the head waiter is
  never grantable, and a lock with waiters always has holders.
- The fencing token of a grant is the log index of the command that caused it, so tokens
  strictly increase per lock across grants, leaders, restarts and even after the lock
  was forgotten (see `max_tombstones`). Shared waiters granted by one command share it.
- Wait-for graph (among owners): a waiter W waits for every holder of its lock and for
  every waiter ahead of it unless both are shared (two shared waiters with only shared
  waiters between them are granted together, so neither waits for the other; a shared
  waiter behind an exclusive one waits for it, and through it for everything ahead).
  An acquire whose enqueuing would close a cycle is refused. Grants, releases, expiries
  and cancellations never add a reachability the graph did not have, so checking at
  enqueue time keeps the graph acyclic forever.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from enum import StrEnum

from service.locks.deadlines import DeadlineHeap, Key

# Free locks remembered (only their last_token) before the oldest is forgotten.
DEFAULT_MAX_TOMBSTONES = 100_000


class Mode(StrEnum):
    EXCLUSIVE = "exclusive"
    SHARED = "shared"


@dataclass(frozen=True, slots=True)
class Hold:
    owner: str
    mode: Mode
    token: int
    ttl_ms: int
    expires_at_ms: int
    # The lease epoch the deadline was set in: after a later leader change the hold's
    # deadline is that change's now + ttl_ms instead (see LockTable.leader_change).
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Waiter:
    # Log index of the acquire that enqueued it: unique, and FIFO order is seq order.
    seq: int
    owner: str
    mode: Mode
    ttl_ms: int  # the lease length it gets once granted
    wait_ms: int  # how long it may wait before the leader may drop it (see expire_wait)
    deadline_ms: int
    epoch: int = 0  # as Hold.epoch, with wait_ms


@dataclass(slots=True)
class LockState:
    name: str
    last_token: int = 0
    holders: dict[str, Hold] = field(default_factory=dict)
    waiters: list[Waiter] = field(default_factory=list)
    # Index of the command that freed it (orders tombstone eviction); 0 while busy.
    freed_at: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.holders or self.waiters)

    @property
    def mode(self) -> Mode | None:
        for hold in self.holders.values():
            return hold.mode
        return None

    def waiter_index(self, seq: int) -> int | None:
        """Where the wait `seq` is in the queue (FIFO order is seq order: a bisection)."""
        pos = bisect_left(self.waiters, seq, key=_seq)
        return pos if pos < len(self.waiters) and self.waiters[pos].seq == seq else None

    def sorted_holders(self) -> tuple[Hold, ...]:
        return tuple(sorted(self.holders.values(), key=lambda h: (h.token, h.owner)))


def compatible(mode: Mode, holders: dict[str, Hold]) -> bool:
    if not holders:
        return True
    # Holders are one exclusive or any number of shared (the first rule), so the first
    # tells: checking them all made n shared acquires of one lock cost n^2/2 steps.
    return mode is Mode.SHARED and next(iter(holders.values())).mode is Mode.SHARED


def waits_for_each_other(a: Mode, b: Mode) -> bool:
    return a is Mode.EXCLUSIVE or b is Mode.EXCLUSIVE


# --- outcomes and events ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Granted:
    """A grant: the result of an acquire, and an event when a waiter was granted."""

    name: str
    owner: str
    mode: Mode
    token: int
    ttl_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class WaitDropped:
    """Event: a waiter left the queue without being granted (reason: cancelled/expired)."""

    name: str
    owner: str
    seq: int
    reason: str


LockEvent = Granted | WaitDropped


@dataclass(frozen=True, slots=True)
class Queued:
    name: str
    owner: str
    mode: Mode
    seq: int
    position: int  # 1 = next in line
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class Held:
    """Try-lock lost: not grantable now and the caller did not want to wait."""

    name: str


@dataclass(frozen=True, slots=True)
class Deadlock:
    name: str
    # Owners on the cycle: each waits for the next, and the last for the first.
    cycle: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModeConflict:
    name: str
    owner: str
    current: Mode
    requested: Mode
    waiting: bool  # the owner's current request is a wait, not a hold


AcquireOutcome = Granted | Queued | Held | Deadlock | ModeConflict


class ReleaseOutcome(StrEnum):
    RELEASED = "released"
    NOT_HELD = "not_held"
    STALE_TOKEN = "stale_token"


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"
    NOT_WAITING = "not_waiting"


@dataclass(frozen=True, slots=True)
class LockView:
    name: str
    last_token: int
    holders: tuple[Hold, ...]  # by (token, owner)
    waiters: tuple[Waiter, ...]  # FIFO

    @property
    def mode(self) -> Mode | None:
        return self.holders[0].mode if self.holders else None


@dataclass(frozen=True, slots=True)
class Due:
    """A hold whose lease expired (ident = token) or a wait past its deadline (seq)."""

    name: str
    owner: str
    ident: int
    deadline_ms: int


# --- the table -------------------------------------------------------------------


class LockTable:
    def __init__(self, max_tombstones: int = DEFAULT_MAX_TOMBSTONES) -> None:
        self._max_tombstones = max_tombstones
        self._locks: dict[str, LockState] = {}
        self._sorted_names: list[str] | None = None  # sorted(self._locks), when known
        # Lease epoch: bumped by each leader change, with that change's clock. A hold or
        # wait set in an earlier epoch has its deadline from there (see leader_change).
        self._epoch = 0
        self._epoch_now_ms = 0
        self._epoch_changed = False
        # Free locks in the order they became free (dict as an ordered set).
        self._tombstones: dict[str, None] = {}
        # Derived indexes, rebuilt by `replace_all`.
        # owner -> name of each lock it waits on -> (seq, mode) of that wait
        self._waiting_on: dict[str, dict[str, tuple[int, Mode]]] = {}
        self._holding: dict[str, set[str]] = {}  # owner -> names it holds
        self.graph_steps = 0  # edges the deadlock checks walked (tests bound it)
        self._hold_deadlines = DeadlineHeap()
        self._wait_deadlines = DeadlineHeap()
        # Change tracking, drained by the machine.
        self._dirty: set[str] = set()
        # name -> the holders and waits that changed since `take_changes` (None: all)
        self._changes: dict[str, FieldChanges | None] = {}
        self._events: list[LockEvent] = []

    # --- commands ------------------------------------------------------------------

    def acquire(
        self,
        index: int,
        now_ms: int,
        name: str,
        owner: str,
        mode: Mode,
        ttl_ms: int,
        wait: bool,
        wait_ms: int,
    ) -> AcquireOutcome:
        lock = self._locks.get(name)
        if lock is not None:
            hold = lock.holders.get(owner)
            if hold is not None:
                # Re-acquiring returns the current grant unchanged (a retry without a
                # request id must not mint a second token or extend the lease).
                if hold.mode is mode:
                    return self._granted(name, hold)
                return ModeConflict(name, owner, hold.mode, mode, waiting=False)
            pos = self._waiter_pos(lock, owner)
            if pos is not None:
                waiter = lock.waiters[pos]
                if waiter.mode is mode:
                    return self._queued(name, waiter, pos)
                return ModeConflict(name, owner, waiter.mode, mode, waiting=True)
            if not lock.waiters and compatible(mode, lock.holders):
                return self._grant(lock, index, now_ms, owner, mode, ttl_ms)
        else:
            lock = LockState(name)
            self._locks[name] = lock
            self._sorted_names = None
            return self._grant(lock, index, now_ms, owner, mode, ttl_ms)
        if not wait:
            return Held(name)
        cycle = self._cycle_if_enqueued(lock, owner, mode)
        if cycle is not None:
            return Deadlock(name, cycle)
        budget = wait_ms or ttl_ms
        waiter = Waiter(index, owner, mode, ttl_ms, budget, now_ms + budget, self._epoch)
        lock.waiters.append(waiter)
        self._waiting_on.setdefault(owner, {})[name] = (waiter.seq, mode)
        self._wait_deadlines.push(waiter.deadline_ms, (name, owner, waiter.seq))
        self._changed(name, waiter=waiter.seq)
        return self._queued(name, waiter, len(lock.waiters) - 1)

    def release(self, index: int, now_ms: int, name: str, owner: str, token: int) -> ReleaseOutcome:
        lock = self._locks.get(name)
        hold = lock.holders.get(owner) if lock is not None else None
        if lock is None or hold is None:
            return ReleaseOutcome.NOT_HELD
        if hold.token != token:
            return ReleaseOutcome.STALE_TOKEN
        del lock.holders[owner]
        self._stop_holding(owner, name)
        self._changed(name, holder=owner)
        self._after_leave(lock, index, now_ms)
        return ReleaseOutcome.RELEASED

    def keepalive(
        self, now_ms: int, name: str, owner: str, token: int, ttl_ms: int | None
    ) -> Granted | None:
        """Extend a lease to now + ttl (ttl None keeps the hold's ttl); None if not held."""
        lock = self._locks.get(name)
        hold = lock.holders.get(owner) if lock is not None else None
        if lock is None or hold is None or hold.token != token:
            return None
        ttl = hold.ttl_ms if ttl_ms is None else ttl_ms
        hold = replace(hold, ttl_ms=ttl, expires_at_ms=now_ms + ttl, epoch=self._epoch)
        lock.holders[owner] = hold
        self._hold_deadlines.push(hold.expires_at_ms, (name, owner, hold.token))
        self._maybe_rebuild_deadlines()
        self._changed(name, holder=owner)
        return self._granted(name, hold)

    def expire(self, index: int, now_ms: int, name: str, owner: str, token: int) -> bool:
        """End a hold whose lease ran out as of now_ms; False (no-op) if it no longer
        exists, was re-granted with another token, or was kept alive meanwhile."""
        lock = self._locks.get(name)
        hold = lock.holders.get(owner) if lock is not None else None
        if lock is None or hold is None or hold.token != token:
            return False
        if self._expires_at(hold) > now_ms:
            return False
        del lock.holders[owner]
        self._stop_holding(owner, name)
        self._changed(name, holder=owner)
        self._after_leave(lock, index, now_ms)
        return True

    def cancel_wait(
        self, index: int, now_ms: int, name: str, owner: str, seq: int | None
    ) -> CancelOutcome | Granted:
        """Remove the owner's wait so it can never be granted. If the owner already
        holds the lock (granted before the cancel was applied) return that grant so the
        caller can hand it over or release it. `seq`, when given, must match: a late
        cancel must not remove a newer wait of the same owner."""
        lock = self._locks.get(name)
        if lock is None:
            return CancelOutcome.NOT_WAITING
        pos = self._waiter_pos(lock, owner)
        if pos is None or (seq is not None and lock.waiters[pos].seq != seq):
            hold = lock.holders.get(owner)
            return self._granted(name, hold) if hold is not None else CancelOutcome.NOT_WAITING
        self._drop_waiter(lock, pos, "cancelled", index, now_ms)
        return CancelOutcome.CANCELLED

    def expire_wait(self, index: int, now_ms: int, name: str, owner: str, seq: int) -> bool:
        """Drop a wait past its deadline (its client vanished without cancelling)."""
        lock = self._locks.get(name)
        if lock is None:
            return False
        pos = self._waiter_pos(lock, owner)
        if pos is None or lock.waiters[pos].seq != seq:
            return False
        if self._deadline(lock.waiters[pos]) > now_ms:
            return False
        self._drop_waiter(lock, pos, "expired", index, now_ms)
        return True

    def leader_change(self, now_ms: int) -> tuple[int, int]:
        """Give every lease and every wait a full budget on the new leader's clock.

        Deadlines are points on the proposing leader's monotonic clock, and clocks of
        different nodes share no origin: a deadline set by the old leader means nothing
        to the new one. Restarting every lease from the new leader's `now` is safe (a
        holder never loses its lock early; it keeps it at most one TTL longer) and it
        makes every deadline comparable with the `now_ms` of later commands.

        The reset is lazy: it starts a new lease epoch at `now_ms`, and a hold or wait
        whose deadline was set in an earlier epoch counts from there (`_expires_at`,
        `_deadline`); no lock changes. Rewriting every lock did not scale: with 60,000
        held locks each replica spent seconds applying it and writing 60,000 hashes,
        followers stopped answering, the leader stepped down, and the next leader's
        reset did the same (terms 1 to 25 and counting).
        Returns (holds, waits) reset.
        """
        self._epoch += 1
        self._epoch_now_ms = now_ms
        self._epoch_changed = True
        self._rebuild_deadlines()
        holds = sum(len(lock.holders) for lock in self._locks.values())
        waits = sum(len(lock.waiters) for lock in self._locks.values())
        return holds, waits

    def lease_epoch(self) -> tuple[int, int]:
        """(epoch, the now_ms it started at): materialised with the locks."""
        return self._epoch, self._epoch_now_ms

    def take_epoch_change(self) -> bool:
        """Whether the lease epoch changed since the last call."""
        changed, self._epoch_changed = self._epoch_changed, False
        return changed

    # --- queries ---------------------------------------------------------------------

    def get(self, name: str) -> LockView | None:
        lock = self._locks.get(name)
        if lock is None:
            return None
        return LockView(
            name,
            lock.last_token,
            tuple(self._current_hold(h) for h in lock.sorted_holders()),
            tuple(self._current_wait(w) for w in lock.waiters),
        )

    def hold_of(self, name: str, owner: str) -> Granted | None:
        """`owner`'s grant of `name` as it stands, if it holds it. Constant time: a
        blocking acquire asks this as it starts to wait, and building the lock's view
        instead walked the whole queue, quadratic in a burst of waiters."""
        lock = self._locks.get(name)
        hold = lock.holders.get(owner) if lock is not None else None
        return None if hold is None else self._granted(name, hold)

    def is_waiting(self, name: str, owner: str, seq: int) -> bool:
        """Whether `owner`'s wait number `seq` is still queued for `name`."""
        wait = self._waiting_on.get(owner, {}).get(name)
        return wait is not None and wait[0] == seq

    def all_held(self) -> list[LockView]:
        views = (self.get(name) for name in self._names_in_order() if self._locks[name].holders)
        return [v for v in views if v is not None]

    def held_page(self, after: str | None, limit: int) -> tuple[list[LockView], bool]:
        """Held locks named after `after` (from the first when None), in name order: at
        most `limit` of them, and whether more follow. A listing of a large table is
        built a page at a time, so no single step walks every lock."""
        names = self._names_in_order()
        start = 0 if after is None else bisect_right(names, after)
        views: list[LockView] = []
        for name in itertools.islice(names, start, None):
            if not self._locks[name].holders:
                continue
            if len(views) == limit:
                return views, True
            view = self.get(name)
            assert view is not None
            views.append(view)
        return views, False

    def _names_in_order(self) -> list[str]:
        # Kept until a lock is added or forgotten: pages of a listing bisect it.
        if self._sorted_names is None:
            self._sorted_names = sorted(self._locks)
        return self._sorted_names

    def held_count(self) -> int:
        return sum(1 for lock in self._locks.values() if lock.holders)

    def validate(self, name: str, token: int) -> bool:
        lock = self._locks.get(name)
        return lock is not None and any(h.token == token for h in lock.holders.values())

    def expired(self, now_ms: int, limit: int | None = None) -> list[Due]:
        """Holds whose lease ended by now_ms, earliest first (the first `limit`): the
        leader proposes `lock.expire` for each."""
        due = self._hold_deadlines.due(now_ms, self._hold_live, limit)
        return [Due(name, owner, token, d) for d, (name, owner, token) in due]

    def expired_waits(self, now_ms: int, limit: int | None = None) -> list[Due]:
        """Waits past their deadline, earliest first (the first `limit`): the leader
        proposes `lock.expire_wait` for each."""
        due = self._wait_deadlines.due(now_ms, self._wait_live, limit)
        return [Due(name, owner, seq, d) for d, (name, owner, seq) in due]

    def wait_for_graph(self) -> dict[str, tuple[str, ...]]:
        """owner -> owners it waits for (sorted), for diagnostics and tests."""
        return {owner: tuple(sorted(set(self._edges(owner)))) for owner in sorted(self._waiting_on)}

    def names(self) -> list[str]:
        # A copy of the sorted names kept for listings: snapshots ask for every name
        # too, and sorting them all each time cost 14.5 ms of an idle 60,000-lock
        # snapshot (8.0 ms with the kept list).
        return list(self._names_in_order())

    def state(self, name: str) -> LockState | None:
        """The internal record (for the materialiser); callers must not mutate it."""
        return self._locks.get(name)

    # --- change tracking and bulk load ---------------------------------------------

    def unflushed(self) -> AbstractSet[str]:
        """Names changed or forgotten since the last take_changes (a live view)."""
        return self._dirty

    def take_dirty(self) -> list[str]:
        """Names whose state changed (or that were forgotten) since the last call."""
        return [name for name, _ in self.take_changes()]

    def take_changes(self) -> list[tuple[str, FieldChanges | None]]:
        """(name, what changed) for every lock changed or forgotten since the last call,
        by name. None: write the whole lock (it was forgotten); otherwise its header
        fields and the holds and waits named."""
        changes = [(name, self._changes.get(name)) for name in sorted(self._dirty)]
        self._dirty.clear()
        self._changes.clear()
        return changes

    def take_events(self) -> list[LockEvent]:
        events, self._events = self._events, []
        return events

    def replace_all(self, locks: list[LockState], lease_epoch: tuple[int, int] = (0, 0)) -> None:
        """Replace the whole state (from materialised hashes) and rebuild indexes."""
        self._epoch, self._epoch_now_ms = lease_epoch
        self._epoch_changed = False
        self._locks = {lock.name: lock for lock in sorted(locks, key=lambda s: s.name)}
        self._sorted_names = None
        free = sorted((s for s in locks if not s.busy), key=lambda s: (s.freed_at, s.name))
        self._tombstones = {s.name: None for s in free}
        self._waiting_on = {}
        self._holding = {}
        for lock in self._locks.values():
            for waiter in lock.waiters:
                self._waiting_on.setdefault(waiter.owner, {})[lock.name] = (
                    waiter.seq,
                    waiter.mode,
                )
            for owner in lock.holders:
                self._holding.setdefault(owner, set()).add(lock.name)
        self._rebuild_deadlines()
        self._dirty.clear()
        self._changes.clear()
        self._events.clear()
        self._evict_tombstones()

    # --- internals -------------------------------------------------------------------

    def _grant(
        self, lock: LockState, index: int, now_ms: int, owner: str, mode: Mode, ttl_ms: int
    ) -> Granted:
        hold = Hold(owner, mode, index, ttl_ms, now_ms + ttl_ms, self._epoch)
        lock.holders[owner] = hold
        self._holding.setdefault(owner, set()).add(lock.name)
        # Log indexes only grow, so this keeps last_token monotonic by construction.
        lock.last_token = max(index, 0)
        lock.freed_at = 0
        self._tombstones.pop(lock.name, None)
        self._hold_deadlines.push(hold.expires_at_ms, (lock.name, owner, index))
        self._changed(lock.name, holder=owner)
        return self._granted(lock.name, hold)

    def _after_leave(self, lock: LockState, index: int, now_ms: int) -> None:
        """A holder or waiter left: grant from the head, then forget the lock if free."""
        self._changed(lock.name)
        while lock.waiters and compatible(lock.waiters[0].mode, lock.holders):
            waiter = lock.waiters.pop(0)
            self._changed(lock.name, waiter=waiter.seq)
            self._stop_waiting(waiter.owner, lock.name)
            grant = self._grant(lock, index, now_ms, waiter.owner, waiter.mode, waiter.ttl_ms)
            self._events.append(grant)
        if not lock.busy:
            lock.freed_at = index
            self._tombstones[lock.name] = None
            self._evict_tombstones()
        self._maybe_rebuild_deadlines()

    def _drop_waiter(self, lock: LockState, pos: int, reason: str, index: int, now_ms: int) -> None:
        waiter = lock.waiters.pop(pos)
        self._changed(lock.name, waiter=waiter.seq)
        self._stop_waiting(waiter.owner, lock.name)
        self._events.append(WaitDropped(lock.name, waiter.owner, waiter.seq, reason))
        self._after_leave(lock, index, now_ms)

    def _stop_waiting(self, owner: str, name: str) -> None:
        waits = self._waiting_on.get(owner)
        if waits is not None:
            waits.pop(name, None)
            if not waits:
                del self._waiting_on[owner]

    def _changed(self, name: str, *, holder: str | None = None, waiter: int | None = None) -> None:
        """Note a change to lock `name`: its header, and the hold or wait named."""
        self._dirty.add(name)
        if name in self._changes:
            changes = self._changes[name]
            if changes is None:
                return  # rewritten whole anyway
        else:
            changes = self._changes[name] = FieldChanges()
        if holder is not None:
            changes.holders.add(holder)
        if waiter is not None:
            changes.waiters.add(waiter)

    def _rewrite(self, name: str) -> None:
        self._dirty.add(name)
        self._changes[name] = None

    def _stop_holding(self, owner: str, name: str) -> None:
        names = self._holding.get(owner)
        if names is not None:
            names.discard(name)
            if not names:
                del self._holding[owner]

    def _waiter_pos(self, lock: LockState, owner: str) -> int | None:
        """Where `owner` waits in `lock`'s queue."""
        wait = self._waiting_on.get(owner, {}).get(lock.name)
        return None if wait is None else lock.waiter_index(wait[0])

    def _evict_tombstones(self) -> None:
        # Forgetting a free lock is safe for fencing: its next token is a later log
        # index, hence larger than any token it ever had. This only bounds memory.
        while len(self._tombstones) > self._max_tombstones:
            name = next(iter(self._tombstones))
            del self._tombstones[name]
            del self._locks[name]
            self._sorted_names = None
            self._rewrite(name)

    def _blockers(
        self, lock: LockState, mode: Mode, before: int | None, seen: _Explored | None = None
    ) -> Iterator[str]:
        """Owners a waiter of `mode` waits for in `lock`: its holders and the waiters
        ahead of it (seq below `before`; None: the whole queue) unless both are shared.

        With `seen` (one deadlock check), what an earlier call of that check already
        yielded is skipped: the owners behind a hot lock are walked once per check, not
        once per waiter that leads back to it (which made a check quadratic in the
        queue's length, and a queue of n waiters cubic to build).
        """
        name = lock.name
        if seen is None or name not in seen.holders:
            if seen is not None:
                seen.holders.add(name)
            yield from sorted(lock.holders)
        stop = len(lock.waiters) if before is None else bisect_left(lock.waiters, before, key=_seq)
        start = 0
        if seen is not None:
            done_all = seen.all_waiters.get(name, 0)
            if mode is Mode.EXCLUSIVE:
                start = done_all
                seen.all_waiters[name] = max(done_all, stop)
            else:
                start = max(done_all, seen.exclusive_waiters.get(name, 0))
                seen.exclusive_waiters[name] = max(start, stop)
        for waiter in lock.waiters[start:stop]:
            if waits_for_each_other(mode, waiter.mode):
                self.graph_steps += 1
                yield waiter.owner

    def _edges(self, owner: str, seen: _Explored | None = None) -> Iterator[str]:
        waits = self._waiting_on.get(owner, {})
        for name in sorted(waits):
            seq, mode = waits[name]
            yield from self._blockers(self._locks[name], mode, seq, seen)

    def _waiting_for(self, owner: str) -> Iterator[str]:
        """Owners that wait for `owner` (the graph's edges, reversed): every waiter of a
        lock it holds, and every waiter behind it in a queue unless both are shared."""
        for name in sorted(self._holding.get(owner, ())):
            for waiter in self._locks[name].waiters:
                self.graph_steps += 1
                yield waiter.owner
        waits = self._waiting_on.get(owner, {})
        for name in sorted(waits):
            seq, mode = waits[name]
            queue = self._locks[name].waiters
            for waiter in queue[bisect_left(queue, seq, key=_seq) + 1 :]:
                if waits_for_each_other(mode, waiter.mode):
                    self.graph_steps += 1
                    yield waiter.owner

    def _could_close_a_cycle(self, lock: LockState, owner: str, mode: Mode) -> bool:
        """Whether something that (transitively) waits for `owner` is one of the owners
        `owner` would wait for in `lock`: holds it, or waits in its queue (at the tail,
        `owner` would be behind every waiter) unless both are shared. Walks the owners
        waiting for `owner`, which are few where it matters: a client that holds nothing
        and waits nowhere else has none, however long the queue it joins."""
        found: set[str] = set()
        todo = [owner]
        while todo:
            for other in self._waiting_for(todo.pop()):
                if other in found:
                    continue
                if other == owner or lock.name in self._holding.get(other, ()):
                    return True
                wait = self._waiting_on.get(other, {}).get(lock.name)
                if wait is not None and waits_for_each_other(mode, wait[1]):
                    return True
                found.add(other)
                todo.append(other)
        return False

    def _cycle_if_enqueued(self, lock: LockState, owner: str, mode: Mode) -> tuple[str, ...] | None:
        """The cycle that enqueuing owner at the tail of lock would close, if any.

        The graph is acyclic, so a new cycle must pass through the new edges: search
        from the new waiter's blockers for a path back to it (depth first, in sorted
        order so every replica reports the same cycle). Each owner and each stretch of
        a queue is visited once, so a check is linear in the graph it can reach.
        """
        if not self._could_close_a_cycle(lock, owner, mode):
            return None  # the search below finds nothing: spare it its walk
        seen = _Explored()
        parent: dict[str, str] = {}
        stack: list[str] = []
        for target in reversed(list(self._blockers(lock, mode, None, seen))):
            if target not in parent:
                parent[target] = owner
                stack.append(target)
        while stack:
            current = stack.pop()
            if current == owner:
                path = [owner]
                step = parent[owner]
                while step != owner:
                    path.append(step)
                    step = parent[step]
                return (owner, *reversed(path[1:]))
            for nxt in reversed(list(self._edges(current, seen))):
                if nxt not in parent:
                    parent[nxt] = current
                    stack.append(nxt)
        return None

    def _hold_live(self, deadline_ms: int, key: Key) -> bool:
        name, owner, token = key
        lock = self._locks.get(name)
        hold = lock.holders.get(owner) if lock is not None else None
        return hold is not None and hold.token == token and self._expires_at(hold) == deadline_ms

    def _wait_live(self, deadline_ms: int, key: Key) -> bool:
        name, owner, seq = key
        lock = self._locks.get(name)
        if lock is None:
            return False
        pos = self._waiter_pos(lock, owner)
        if pos is None:
            return False
        waiter = lock.waiters[pos]
        return waiter.seq == seq and self._deadline(waiter) == deadline_ms

    def _rebuild_deadlines(self) -> None:
        holds: list[tuple[int, Key]] = []
        waits: list[tuple[int, Key]] = []
        for name, lock in self._locks.items():
            holds.extend(
                (self._expires_at(h), (name, h.owner, h.token)) for h in lock.holders.values()
            )
            waits.extend((self._deadline(w), (name, w.owner, w.seq)) for w in lock.waiters)
        self._hold_deadlines.rebuild(holds)
        self._wait_deadlines.rebuild(waits)

    # --- deadlines across lease epochs ----------------------------------------------

    def _expires_at(self, hold: Hold) -> int:
        if hold.epoch == self._epoch:
            return hold.expires_at_ms
        return self._epoch_now_ms + hold.ttl_ms

    def _deadline(self, waiter: Waiter) -> int:
        if waiter.epoch == self._epoch:
            return waiter.deadline_ms
        return self._epoch_now_ms + waiter.wait_ms

    def _current_hold(self, hold: Hold) -> Hold:
        """The hold as it stands in this epoch (for views and results)."""
        if hold.epoch == self._epoch:
            return hold
        return replace(hold, expires_at_ms=self._expires_at(hold), epoch=self._epoch)

    def _current_wait(self, waiter: Waiter) -> Waiter:
        if waiter.epoch == self._epoch:
            return waiter
        return replace(waiter, deadline_ms=self._deadline(waiter), epoch=self._epoch)

    def _granted(self, name: str, hold: Hold) -> Granted:
        h = hold
        return Granted(name, h.owner, h.mode, h.token, h.ttl_ms, self._expires_at(h))

    def _queued(self, name: str, waiter: Waiter, pos: int) -> Queued:
        w = waiter
        return Queued(name, w.owner, w.mode, w.seq, pos + 1, self._deadline(w))

    def _maybe_rebuild_deadlines(self) -> None:
        if self._hold_deadlines.needs_rebuild() or self._wait_deadlines.needs_rebuild():
            self._rebuild_deadlines()


@dataclass(slots=True)
class FieldChanges:
    """The holds and waits of one lock that began, changed or ended since the last
    `take_changes`: its materialised hash is updated field by field, so a change to a
    lock with a long queue costs what changed, not the queue's length."""

    holders: set[str] = field(default_factory=set)  # owners
    waiters: set[int] = field(default_factory=set)  # seqs


@dataclass(slots=True)
class _Explored:
    """What one deadlock check has walked, per lock name (see `LockTable._blockers`)."""

    # Queues do not change during a check, so positions in them are stable.
    holders: set[str] = field(default_factory=set)  # locks whose holders were yielded
    all_waiters: dict[str, int] = field(default_factory=dict)  # every waiter before this position
    exclusive_waiters: dict[str, int] = field(default_factory=dict)  # the exclusive ones before


def _seq(waiter: Waiter) -> int:
    return waiter.seq

