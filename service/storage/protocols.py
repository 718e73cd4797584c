"""Small storage Protocols the runner depends on.

Each has a Redis implementation (`redis_store.py`) and an in-memory one (`memory.py`);
`tests/storage/test_contract.py` runs one suite against both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.raft.messages import Entry, HardState, Snapshot


class StableStore(Protocol):
    """Term and vote, always written together."""

    async def load_hard_state(self) -> HardState: ...

    async def save_hard_state(self, state: HardState) -> None: ...


class LogStore(Protocol):
    """The persisted Raft log after the last snapshot."""

    async def first_index(self) -> int:
        """Index of the first stored entry; last_index()+1 when the log is empty."""
        ...

    async def last_index(self) -> int:
        """Index of the last stored entry; 0 (or the snapshot index) when empty."""
        ...

    async def entries(self, lo: int, hi: int) -> list[Entry]:
        """Stored entries with lo <= index < hi, in order."""
        ...

    async def append(self, entries: Sequence[Entry]) -> None:
        """Store entries; any stored entry at or after entries[0].index is replaced."""
        ...

    async def compact(self, upto: int) -> None:
        """Drop entries with index <= upto (they are covered by a snapshot)."""
        ...


class SnapshotStore(Protocol):
    async def save_snapshot(self, snapshot: Snapshot) -> None: ...

    async def load_snapshot(self) -> Snapshot | None: ...


class RaftStorage(StableStore, LogStore, SnapshotStore, Protocol):
    async def persist(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """Group commit: write all three atomically in one round trip.

        A snapshot, when given, is written first: entries up to its index are dropped, and
        so is everything after it unless the stored entry at the snapshot's index has the
        snapshot's term (Raft's InstallSnapshot rule); then entries are appended (replacing
        any conflicting suffix); then the hard state.
        """
        ...


@dataclass(frozen=True, slots=True)
class HashWrite:
    """One change to a materialised Redis hash: set `fields`, delete `deleted`; if
    `drop` is true the whole key is deleted first."""

    key: str
    fields: Mapping[str, str]
    deleted: tuple[str, ...] = ()
    drop: bool = False


def merge_hash_writes(writes: Sequence[HashWrite]) -> list[HashWrite]:
    """The same changes in one write per key: applying the result has the effect of
    applying `writes` in order. Fewer, larger commands when a background writer has
    fallen a few batches behind (a lock acquired and released in between is one write).
    Linear in the total number of fields (a busy dedup hash gets many writes a batch)."""
    merged: dict[str, tuple[bool, dict[str, str], set[str]]] = {}
    for write in writes:
        before = merged.get(write.key)
        if before is None or write.drop:
            merged[write.key] = (write.drop, dict(write.fields), set(write.deleted))
            continue
        _, fields, deleted = before
        for name in write.deleted:
            fields.pop(name, None)
            deleted.add(name)
        deleted.difference_update(write.fields)
        fields.update(write.fields)
    return [
        HashWrite(key, fields, tuple(sorted(deleted)), drop)
        for key, (drop, fields, deleted) in merged.items()
    ]


class StateStore(Protocol):
    """Applied state, materialised as Redis hashes an operator can read with redis-cli."""

    async def load_applied_index(self) -> int: ...

    async def apply(self, writes: Sequence[HashWrite], applied_index: int) -> None:
        """Write the changes and the new applied index in one transaction."""
        ...

    async def load_prefix(self, prefix: str) -> dict[str, dict[str, str]]:
        """Every hash whose key starts with prefix, for rebuilding state at start."""
        ...

    async def replace_all(
        self,
        prefixes: Sequence[str],
        hashes: Mapping[str, Mapping[str, str]],
        applied_index: int,
    ) -> None:
        """In one transaction: drop every key under any of prefixes, write hashes and the
        applied index (restoring all state machines from a snapshot at once, so a crash
        can never leave some machines restored and others not)."""
        ...
