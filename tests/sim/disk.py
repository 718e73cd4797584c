"""Durable storage and a materialised state machine for one simulated node.

`Disk` holds exactly what survives a crash: the hard state, the log, the snapshot and the
state machine (which, like dsync's Redis hashes, is written with its applied index in one
step). Writes follow the Ready contract of service/raft/core.py: a snapshot first (dropping
the log it covers, or the whole log when the log contradicts it), then entries replacing any
persisted suffix from entries[0].index, then the hard state.

The state machine is a hash chain over the applied entries, so two nodes that applied the
same entries in the same order hold equal states, and a snapshot is that digest serialised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from service.raft.messages import Entry, HardState, Ready, Snapshot

GENESIS = b"\x00" * 16


class StorageViolation(AssertionError):
    """A write the Ready contract says can never happen (a gap, a snapshot moving back)."""


def chain(digest: bytes, entry: Entry) -> bytes:
    h = hashlib.blake2b(digest, digest_size=16)
    h.update(b"%d|%d|%d|" % (entry.index, entry.term, int(entry.kind)))
    h.update(entry.data)
    return h.digest()


@dataclass(slots=True)
class StateMachine:
    applied: int = 0
    digest: bytes = GENESIS

    def apply(self, entry: Entry) -> None:
        if entry.index != self.applied + 1:
            raise StorageViolation(
                f"applying entry {entry.index} to a state machine at {self.applied}"
            )
        self.digest = chain(self.digest, entry)
        self.applied = entry.index

    def serialise(self) -> bytes:
        return b"%d:%s" % (self.applied, self.digest.hex().encode())

    @staticmethod
    def deserialise(data: bytes) -> StateMachine:
        applied, digest = data.split(b":")
        return StateMachine(int(applied), bytes.fromhex(digest.decode()))


@dataclass(slots=True)
class Disk:
    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)
    machine: StateMachine = field(default_factory=StateMachine)
    rejoining: bool = False  # back from a lost disk and not caught up yet (a marker)

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.meta.index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot_index

    def term_at(self, index: int) -> int | None:
        snap = self.snapshot
        if snap is not None and index == snap.meta.index:
            return snap.meta.term
        first = self.snapshot_index + 1
        if index < first or index > self.last_index:
            return None
        return self.entries[index - first].term

    def persist(self, rd: Ready) -> None:
        """One atomic group commit of a Ready's durable parts."""
        if rd.snapshot is not None:
            self._write_snapshot(rd.snapshot)
        if rd.entries:
            first = rd.entries[0].index
            if first <= self.snapshot_index:
                raise StorageViolation(
                    f"entry {first} is covered by the snapshot at {self.snapshot_index}"
                )
            if first > self.last_index + 1:
                raise StorageViolation(f"entries from {first} leave a gap after {self.last_index}")
            del self.entries[first - self.snapshot_index - 1 :]
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """The runner's own snapshot of its state machine (before compacting the log)."""
        self._write_snapshot(snapshot)

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        if meta.index < self.snapshot_index:
            raise StorageViolation(
                f"snapshot at {meta.index} older than the stored one at {self.snapshot_index}"
            )
        # Raft's InstallSnapshot rule: keep the suffix only if the log holds the snapshot's
        # last entry; otherwise the whole log belongs to a contradicted history.
        keep = self.term_at(meta.index) == meta.term
        if keep:
            del self.entries[: meta.index - self.snapshot_index]
        else:
            self.entries = []
        self.snapshot = snapshot

    def install(self, snapshot: Snapshot) -> None:
        """Materialise a received snapshot in the state machine."""
        self.machine = StateMachine.deserialise(snapshot.data)
        if self.machine.applied != snapshot.meta.index:
            raise StorageViolation("snapshot data does not match its index")
