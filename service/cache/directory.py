"""The home node's directory: who holds each key, and the one transaction running on it.

Pure and deterministic: `step(message, now_ms)` and `tick(now_ms)` return actions (see
`messages.py`); sharers are kept in dicts but always visited in sorted order.

Design choices, and why:
- A blocking directory. Each key runs one transaction at a time (a GetS or GetM), and it
  stays busy until every message of that transaction has arrived: the invalidation
  acks, the owner's FwdDone, and the requester's Unblock. Requests and eviction notices
  that arrive meanwhile wait in a FIFO queue. So however the network reorders
  messages, a node never receives a message of transaction n+1 for a key before it has
  finished transaction n, which lets the nodes get by without transient states.
  (RecoveringDirectory ends a shared grant's transaction without waiting for its
  Unblock; its nodes' txn floors make that safe: see recovery.py.)
- Writes complete only once every other copy is gone: on GetM the home invalidates all
  sharers and sends Data(M) only after the last InvAck (or lease expiry); the requester
  applies the write on arrival, so a write is acknowledged only when it is the sole copy.
- A write waits at most one lease. Each sharer's lease is counted from the Unblock (or
  FwdDone) that made it a sharer, which on any clock ticking at the same rate is no
  earlier than the sharer's own count (see `lines.py`). A sharer that has not acked an
  Inv by `now_ms >= lease end` is dropped, since its copy has stopped serving; sharers
  already past their lease are dropped without an Inv at all.
- Three-hop forwarding: an owner serves the requester directly and also sends the value
  to the home in FwdDone, so the home's value is current whenever the key is not owned
  and a dirty value survives even if the requester then crashes.
- `txn` numbers transactions per key; replies and notices from any other transaction are
  dropped (PutS/PutE/PutM must match the grant they came from, so a late notice from
  an older copy can never remove a newer one). Data travels with its version and only
  replaces older data.
- Entries of deleted keys are retired. An entry with no copies, no value and nothing
  running or queued is dropped (its hash deleted), so a home holds state only for keys
  that have a value or a copy, however many distinct keys come and go. What the entry
  still guarded is that its key's txn and version only grow: late messages are told
  apart by txn, and versions name values. So the home keeps one *retired floor*, the
  highest txn and version of any entry it dropped (persisted, in the same transaction
  as the deletion, under the key "" that no cache key can have), and a key it has no
  entry for starts from that floor. A dropped key therefore reads as absent at the
  floor's version (at least its own last version) and its next write gets a version
  above any the key had.
- Persistence: the entry's stable fields (state, owner, sharers, version, value, txn)
  are persisted before anything is sent, and they already describe the transaction's
  outcome once the grant is on its way. The lease times are not persisted: they are on
  a clock that does not survive a restart, so `from_hash` restarts every sharer's lease
  at full length (a restarted home waits one whole lease before dropping a silent
  sharer, which is safe since it is longer than the sharer's own lease).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from service.cache.messages import (
    Action,
    Data,
    DirState,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    HomeMessage,
    Inv,
    InvAck,
    Message,
    PersistEntry,
    PutAck,
    PutE,
    PutM,
    PutS,
    Send,
    State,
    Unblock,
)
from service.cache.values import decode

QueuedMessage = GetS | GetM | PutS | PutE | PutM
RETIRED_KEY = ""  # the persisted retired floor's key: never a cache key (1-512 bytes)


@dataclass(slots=True)
class DirEntry:
    key: str
    state: DirState = DirState.I
    owner: str | None = None
    owner_txn: int = 0  # the grant the owner's copy came from
    sharers: dict[str, int] = field(default_factory=dict)  # node -> txn of its grant
    leases: dict[str, int] = field(default_factory=dict)  # node -> lease end; not persisted
    version: int = 0  # version of `data`
    data: str | None = None  # the home's value (JSON text); None: absent
    txn: int = 0  # the latest transaction number issued for this key

    def to_hash(self) -> dict[str, str]:
        """The Redis hash mirroring this entry (`dsync:cache:dir:<key>`)."""
        fields = {
            "state": self.state.value,
            "owner": self.owner or "",
            "owner_txn": str(self.owner_txn),
            "sharers": json.dumps(self.sharers, sort_keys=True, separators=(",", ":")),
            "version": str(self.version),
            "txn": str(self.txn),
        }
        if self.data is not None:
            fields["value"] = self.data
        return fields

    @classmethod
    def from_hash(
        cls, key: str, fields: Mapping[str, str], *, now_ms: int, lease_ms: int
    ) -> DirEntry:
        """Reload an entry; every sharer's lease restarts at full length from `now_ms`."""
        try:
            state = DirState(fields["state"])
            owner = fields.get("owner") or None
            raw = json.loads(fields.get("sharers") or "{}")
            if not isinstance(raw, dict) or not all(
                isinstance(n, str) and isinstance(t, int) for n, t in raw.items()
            ):
                raise ValueError("sharers must map node names to txn numbers")
            sharers: dict[str, int] = raw
            entry = cls(
                key,
                state,
                owner,
                int(fields.get("owner_txn", "0")),
                sharers,
                {n: now_ms + lease_ms for n in sharers},
                int(fields["version"]),
                fields.get("value"),
                int(fields["txn"]),
            )
            if entry.data is not None:
                decode(entry.data)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed cache directory hash for {key!r}: {exc!r}") from exc
        problem = entry.inconsistency()
        if problem:
            raise ValueError(f"inconsistent cache directory hash for {key!r}: {problem}")
        return entry

    def inconsistency(self) -> str | None:
        if (self.state is DirState.OWNED) != (self.owner is not None):
            return "an owner is recorded exactly when the state is owned"
        if (self.state is DirState.S) != bool(self.sharers):
            return "sharers are recorded exactly when the state is S"
        if self.version < 0 or self.txn < 0:
            return "negative version or txn"
        return None

    def copy(self) -> DirEntry:
        return DirEntry(
            self.key,
            self.state,
            self.owner,
            self.owner_txn,
            dict(self.sharers),
            dict(self.leases),
            self.version,
            self.data,
            self.txn,
        )


@dataclass(slots=True)
class _Txn:
    id: int
    want: State  # S for GetS, M for GetM
    requester: str
    acks: dict[str, int] = field(default_factory=dict)  # sharer still to ack -> lease end
    fwd_to: str | None = None  # owner whose FwdDone is awaited
    granted: bool = False  # Data is on its way to the requester
    unblocked_at: int | None = None

    @property
    def done(self) -> bool:
        return (
            self.granted and self.unblocked_at is not None and self.fwd_to is None and not self.acks
        )


class _Out:
    def __init__(self) -> None:
        self.dirty: set[str] = set()
        self.retired: set[str] = set()  # entries dropped: their hashes are deleted
        self.floor_raised = False
        self.sends: list[Action] = []

    def send(self, to: str, message: Message) -> None:
        self.sends.append(Send(to, message))


class Directory:
    def __init__(self, node: str, *, lease_ms: int = 5_000) -> None:
        if lease_ms <= 0:
            raise ValueError("lease_ms must be positive")
        self.node = node
        self.lease_ms = lease_ms
        self._entries: dict[str, DirEntry] = {}
        self.retired_txn = 0  # the highest txn of any entry dropped (see the docstring)
        self.retired_version = 0  # the highest version of any entry dropped
        self.retired = 0  # entries dropped
        self._busy: dict[str, _Txn] = {}
        self._queues: dict[str, deque[QueuedMessage]] = {}
        self.lease_drops = 0  # sharers dropped because their lease ran out unacked
        self.stale_dropped = 0  # messages discarded as late (wrong txn or older version)

    # ---- queries -------------------------------------------------------------------------

    def entry(self, key: str) -> DirEntry:
        """A copy of the entry for `key` (a fresh I entry if the home never saw it)."""
        entry = self._entries.get(key)
        return self._fresh(key) if entry is None else entry.copy()

    def entries(self) -> Iterator[DirEntry]:
        for key in sorted(self._entries):
            yield self._entries[key].copy()

    def entry_count(self) -> int:
        return len(self._entries)

    def is_busy(self, key: str) -> bool:
        return key in self._busy

    def idle(self) -> bool:
        """No transaction running and nothing queued, for any key."""
        return not self._busy and not any(self._queues.values())

    def next_deadline(self) -> int | None:
        """When `tick` could next drop a silent sharer; None if nothing waits on a lease."""
        deadlines = [d for txn in self._busy.values() for d in txn.acks.values()]
        return min(deadlines) if deadlines else None

    # ---- restart -------------------------------------------------------------------------

    def restore(self, key: str, fields: Mapping[str, str], now_ms: int) -> None:
        if key == RETIRED_KEY:
            try:
                self.retired_txn = max(self.retired_txn, int(fields["txn"]))
                self.retired_version = max(self.retired_version, int(fields["version"]))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"malformed retired floor hash: {exc!r}") from exc
            return
        self._entries[key] = DirEntry.from_hash(key, fields, now_ms=now_ms, lease_ms=self.lease_ms)

    # ---- entry points --------------------------------------------------------------------

    def step(self, msg: HomeMessage, now_ms: int) -> list[Action]:
        out = _Out()
        key = msg.key
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._fresh(key)
        match msg:
            case GetS() | GetM() | PutS() | PutE() | PutM():
                if key in self._busy:
                    self._queues.setdefault(key, deque()).append(msg)
                else:
                    self._begin(entry, msg, now_ms, out)
            case InvAck():
                self._on_inv_ack(entry, msg, out)
            case FwdDone():
                self._on_fwd_done(entry, msg, now_ms, out)
            case Unblock():
                txn = self._busy.get(key)
                if txn is not None and txn.id == msg.txn and txn.requester == msg.sender:
                    txn.unblocked_at = now_ms
                else:
                    self.stale_dropped += 1
        self._expire(entry, now_ms, out)
        self._settle(entry, now_ms, out)
        self._retire_if_unused(entry, out)
        return self._actions(out)

    def retire_unused(self) -> list[Action]:
        """After restoring: retire every unused entry (one left by a version that kept
        them, or whose retirement had not been persisted yet)."""
        out = _Out()
        for key in sorted(self._entries):
            self._retire_if_unused(self._entries[key], out)
        return self._actions(out)

    def tick(self, now_ms: int) -> list[Action]:
        """Drop sharers whose lease ended without an InvAck; complete the writes they held.
        Call it at `next_deadline()` (`step` also catches up on the key it handles)."""
        out = _Out()
        for key in sorted(self._busy):
            entry = self._entries[key]
            self._expire(entry, now_ms, out)
            self._settle(entry, now_ms, out)
            self._retire_if_unused(entry, out)
        return self._actions(out)

    def _expire(self, entry: DirEntry, now: int, out: _Out) -> None:
        txn = self._busy.get(entry.key)
        if txn is None or not txn.acks:
            return
        for node in sorted(n for n, end in txn.acks.items() if end <= now):
            del txn.acks[node]
            self.lease_drops += 1
            self._drop_sharer(entry, node, out)
        if not txn.acks:
            self._grant_exclusive(entry, txn, State.M, out)

    def _actions(self, out: _Out) -> list[Action]:
        persists: list[Action] = []
        if out.floor_raised:  # first: a deletion below must never land without it
            floor = {"txn": str(self.retired_txn), "version": str(self.retired_version)}
            persists.append(PersistEntry(RETIRED_KEY, floor))
        for key in sorted(out.dirty | out.retired):
            entry = self._entries.get(key)
            persists.append(PersistEntry(key, None if entry is None else entry.to_hash()))
        return persists + out.sends

    def _fresh(self, key: str) -> DirEntry:
        """The entry of a key the home has none for: it starts from the retired floor."""
        return DirEntry(key, version=self.retired_version, txn=self.retired_txn)

    def _retire_if_unused(self, entry: DirEntry, out: _Out) -> None:
        """Drop the entry of a deleted key nobody holds (see the module docstring)."""
        key = entry.key
        if (
            entry.state is not DirState.I
            or entry.data is not None
            or key in self._busy
            or self._queues.get(key)
            or self._entries.get(key) is not entry
        ):
            return
        del self._entries[key]
        self.retired += 1
        if entry.txn > self.retired_txn or entry.version > self.retired_version:
            self.retired_txn = max(self.retired_txn, entry.txn)
            self.retired_version = max(self.retired_version, entry.version)
            out.floor_raised = True
        out.retired.add(key)

    # ---- requests and notices ------------------------------------------------------------

    def _begin(self, entry: DirEntry, msg: QueuedMessage, now: int, out: _Out) -> None:
        match msg:
            case GetS():
                self._get(entry, msg.sender, State.S, now, out)
            case GetM():
                self._get(entry, msg.sender, State.M, now, out)
            case PutS():
                if entry.sharers.get(msg.sender) == msg.txn:
                    self._drop_sharer(entry, msg.sender, out)
                else:
                    self.stale_dropped += 1
            case PutE() | PutM():
                self._on_put(entry, msg, out)

    def _get(self, entry: DirEntry, requester: str, want: State, now: int, out: _Out) -> None:
        entry.txn += 1
        out.dirty.add(entry.key)
        txn = _Txn(entry.txn, want, requester)
        self._busy[entry.key] = txn
        owner = entry.owner
        if entry.state is DirState.OWNED and owner is not None and owner != requester:
            txn.fwd_to = owner
            fwd: Message
            if want is State.S:
                fwd = FwdGetS(entry.key, self.node, txn.id, requester, self.lease_ms)
            else:
                fwd = FwdGetM(entry.key, self.node, txn.id, requester)
            out.send(owner, fwd)
            return
        if entry.state is DirState.OWNED:
            # The owner itself asks: it lost its copy (a crash before persisting), so
            # the home's value is the latest that survives.
            self._disown(entry)
        for node in sorted(entry.sharers):
            if entry.leases.setdefault(node, now + self.lease_ms) <= now:
                self._drop_sharer(entry, node, out)
        others = [n for n in sorted(entry.sharers) if n != requester]
        if want is State.S and others:
            entry.sharers[requester] = txn.id
            entry.state = DirState.S
            out.send(
                requester,
                Data(
                    entry.key,
                    self.node,
                    txn.id,
                    State.S,
                    entry.data,
                    entry.version,
                    self.lease_ms,
                ),
            )
            txn.granted = True
            self._granted_shared(txn, now)
        elif want is State.M and others:
            for node in others:
                txn.acks[node] = entry.leases[node]
                out.send(node, Inv(entry.key, self.node, txn.id))
        else:
            self._grant_exclusive(entry, txn, State.E if want is State.S else State.M, out)

    def _on_put(self, entry: DirEntry, msg: PutE | PutM, out: _Out) -> None:
        current = (
            entry.state is DirState.OWNED
            and entry.owner == msg.sender
            and entry.owner_txn == msg.txn
            and msg.version >= entry.version
        )
        if current:
            if isinstance(msg, PutM):
                self._adopt(entry, msg.data, msg.version)
            self._disown(entry)
            out.dirty.add(entry.key)
        else:
            self.stale_dropped += 1
        # Acked even when stale, so the node can drop its eviction buffer.
        out.send(msg.sender, PutAck(entry.key, self.node, msg.txn))

    # ---- replies within the running transaction ------------------------------------------

    def _on_inv_ack(self, entry: DirEntry, msg: InvAck, out: _Out) -> None:
        txn = self._busy.get(entry.key)
        if txn is None or txn.id != msg.txn or msg.sender not in txn.acks:
            self.stale_dropped += 1
            return  # late: that transaction is over, or this sharer was already dropped
        del txn.acks[msg.sender]
        if msg.dirty:
            self._adopt(entry, msg.data, msg.version)
        self._drop_sharer(entry, msg.sender, out)
        if not txn.acks:
            self._grant_exclusive(entry, txn, State.M, out)

    def _on_fwd_done(self, entry: DirEntry, msg: FwdDone, now: int, out: _Out) -> None:
        txn = self._busy.get(entry.key)
        if txn is None or txn.id != msg.txn or txn.fwd_to != msg.sender:
            self.stale_dropped += 1
            return
        txn.fwd_to = None
        self._disown(entry)
        out.dirty.add(entry.key)
        if not msg.has_data:
            # The owner had nothing to hand over: serve the requester from our value.
            self._grant_exclusive(entry, txn, State.E if txn.want is State.S else State.M, out)
            return
        self._adopt(entry, msg.data, msg.version)
        if txn.want is State.M:
            entry.state = DirState.OWNED
            entry.owner = txn.requester
            entry.owner_txn = txn.id
        else:
            entry.state = DirState.S
            entry.sharers[txn.requester] = txn.id
            if msg.kept:
                entry.sharers[msg.sender] = txn.id
                entry.leases[msg.sender] = now + self.lease_ms
        txn.granted = True
        if txn.want is State.S:
            self._granted_shared(txn, now)

    # ---- helpers -------------------------------------------------------------------------

    def _grant_exclusive(self, entry: DirEntry, txn: _Txn, state: State, out: _Out) -> None:
        entry.sharers.clear()
        entry.leases.clear()
        entry.state = DirState.OWNED
        entry.owner = txn.requester
        entry.owner_txn = txn.id
        out.dirty.add(entry.key)
        out.send(
            txn.requester,
            Data(entry.key, self.node, txn.id, state, entry.data, entry.version),
        )
        txn.granted = True

    def _granted_shared(self, txn: _Txn, now: int) -> None:
        """A shared copy is on its way to the requester. This home waits for its Unblock
        (RecoveringDirectory does not: see recovery.py)."""

    def _disown(self, entry: DirEntry) -> None:
        entry.state = DirState.I
        entry.owner = None
        entry.owner_txn = 0

    def _drop_sharer(self, entry: DirEntry, node: str, out: _Out) -> None:
        entry.sharers.pop(node, None)
        entry.leases.pop(node, None)
        if entry.state is DirState.S and not entry.sharers:
            entry.state = DirState.I
        out.dirty.add(entry.key)

    def _adopt(self, entry: DirEntry, data: str | None, version: int) -> None:
        """Take a value from a node if it is newer than ours (an older one is stale)."""
        if version > entry.version:
            entry.data = data
            entry.version = version

    def _settle(self, entry: DirEntry, now: int, out: _Out) -> None:
        """Finish a completed transaction, then start queued work until one blocks."""
        key = entry.key
        while True:
            txn = self._busy.get(key)
            if txn is not None:
                if not txn.done:
                    return
                if txn.unblocked_at is not None and txn.requester in entry.sharers:
                    entry.leases[txn.requester] = txn.unblocked_at + self.lease_ms
                del self._busy[key]
            queue = self._queues.get(key)
            if not queue:
                self._queues.pop(key, None)
                return
            self._begin(entry, queue.popleft(), now, out)
