"""Log-shape rules both storage implementations enforce identically.

They live here so the in-memory store used by the simulator can never accept a write
the Redis store would treat differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from service.raft.messages import Entry, Snapshot, SnapshotMeta


def check_write(entries: Sequence[Entry], snapshot: Snapshot | None) -> None:
    """Refuse a batch that cannot be a piece of one Raft log."""
    if entries and entries[0].index < 1:
        raise ValueError(f"log indexes start at 1, got {entries[0].index}")
    for prev, cur in pairwise(entries):
        if cur.index != prev.index + 1:
            raise ValueError(f"entries must be consecutive: {prev.index} then {cur.index}")
    if snapshot is not None and entries and entries[0].index <= snapshot.meta.index:
        raise ValueError(
            f"entry {entries[0].index} is covered by the snapshot at {snapshot.meta.index}"
        )


def snapshot_keeps_suffix(
    new: SnapshotMeta, term_at_index: int | None, stored: SnapshotMeta | None
) -> bool:
    """Raft's InstallSnapshot rule: entries after the snapshot survive only if the log
    already holds the snapshot's last entry (same index and term); otherwise they belong
    to a history the snapshot contradicts and the whole log goes.

    Raises for a snapshot older than the stored one: accepting it would move the log's
    start backwards over entries that no longer exist.
    """
    if stored is not None and new.index < stored.index:
        raise ValueError(f"snapshot at {new.index} is older than the stored one at {stored.index}")
    if term_at_index is not None:
        return term_at_index == new.term
    return stored is not None and (stored.index, stored.term) == (new.index, new.term)
