"""The Raft core's in-memory view of its log: a snapshot boundary plus entries after it.

The core keeps every entry since the last snapshot in memory (compaction bounds that), and
remembers which suffix has not yet been handed to the runner for persistence.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.raft.messages import Entry


class RaftLog:
    def __init__(
        self,
        snapshot_index: int = 0,
        snapshot_term: int = 0,
        entries: Sequence[Entry] = (),
    ) -> None:
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self._entries: list[Entry] = []
        for entry in entries:
            if entry.index <= snapshot_index:
                continue
            if entry.index != self.last_index + 1:
                raise ValueError(f"log gap at index {entry.index} after {self.last_index}")
            self._entries.append(entry)
        # Entries with index >= unstable_from are not yet persisted by the runner.
        self.unstable_from = self.last_index + 1

    # --- reads -----------------------------------------------------------

    @property
    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else self.snapshot_index

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot_term

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    def term_at(self, index: int) -> int | None:
        """Term of the entry at index; None when compacted away or beyond the end."""
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index or index > self.last_index:
            return None
        return self._entries[index - self.snapshot_index - 1].term

    def entry(self, index: int) -> Entry:
        return self._entries[index - self.snapshot_index - 1]

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi; lo must be after the snapshot."""
        if lo <= self.snapshot_index:
            raise ValueError(f"index {lo} is compacted (snapshot at {self.snapshot_index})")
        start = lo - self.snapshot_index - 1
        stop = min(hi, self.last_index + 1) - self.snapshot_index - 1
        return self._entries[start:stop]

    def unstable(self) -> list[Entry]:
        return self.slice(self.unstable_from, self.last_index + 1)

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: is a log ending at (last_index, last_term) at least as new as ours?"""
        if last_term != self.last_term:
            return last_term > self.last_term
        return last_index >= self.last_index

    def first_index_of_term(self, index: int, floor: int) -> int:
        """The first index (> floor) of the run of entries sharing the term at `index`."""
        term = self.term_at(index)
        while index - 1 > floor and self.term_at(index - 1) == term:
            index -= 1
        return index

    # --- writes ----------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries that directly follow the last index (leader path)."""
        for entry in entries:
            if entry.index != self.last_index + 1:
                raise ValueError(f"append at {entry.index}, expected {self.last_index + 1}")
            self._entries.append(entry)

    def merge(self, entries: Sequence[Entry]) -> tuple[int, list[Entry]]:
        """Follower path: skip entries we already have, truncate at the first conflict,
        append the rest. Returns (index of the first truncated entry or 0, new entries)."""
        for pos, entry in enumerate(entries):
            if entry.index <= self.snapshot_index:
                continue  # covered by our snapshot: committed, so it matches
            existing = self.term_at(entry.index)
            if existing == entry.term:
                continue
            truncated_at = 0
            if existing is not None:
                truncated_at = entry.index
                del self._entries[entry.index - self.snapshot_index - 1 :]
                self.unstable_from = min(self.unstable_from, entry.index)
            added = list(entries[pos:])
            self.append(added)
            return truncated_at, added
        return 0, []

    def mark_stable(self, upto: int) -> None:
        self.unstable_from = max(self.unstable_from, upto + 1)

    def compact(self, index: int, term: int) -> None:
        """Drop entries up to index (now covered by a snapshot taken at index)."""
        if index <= self.snapshot_index:
            return
        if index > self.last_index:
            raise ValueError(f"cannot compact to {index} beyond last index {self.last_index}")
        del self._entries[: index - self.snapshot_index]
        self.snapshot_index = index
        self.snapshot_term = term

    def restore(self, index: int, term: int) -> None:
        """Replace the whole log with a snapshot boundary (InstallSnapshot)."""
        self._entries = []
        self.snapshot_index = index
        self.snapshot_term = term
        self.unstable_from = index + 1
