"""In-memory storage for unit tests and the simulator.

Every completed write counts as durable (it models a write that was fsynced before it
returned). ``crash()`` models the process dying: it hands back a fresh store holding the
durable data and makes the old one refuse further use, so a task that outlived its
"process" in a simulation fails loudly instead of writing into the new one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from service.raft.messages import Entry, HardState, Snapshot
from service.storage import keys
from service.storage.protocols import HashWrite, RaftStorage, StateStore
from service.storage.rules import check_write, snapshot_keeps_suffix


class StoreCrashedError(RuntimeError):
    """A store was used after crash() replaced it."""


class InMemoryRaftStorage:
    """RaftStorage over a contiguous list of entries."""

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._log: list[Entry] = []
        self._snapshot: Snapshot | None = None
        self._crashed = False
        # Lets runner tests check group commit (one persist per loop turn).
        self.persist_count = 0

    def crash(self) -> InMemoryRaftStorage:
        self._check_alive()
        self._crashed = True
        survivor = InMemoryRaftStorage()
        survivor._hard_state = self._hard_state
        survivor._log = list(self._log)
        survivor._snapshot = self._snapshot
        return survivor

    def _check_alive(self) -> None:
        if self._crashed:
            raise StoreCrashedError("this storage was replaced by crash()")

    async def load_hard_state(self) -> HardState:
        self._check_alive()
        return self._hard_state

    async def save_hard_state(self, state: HardState) -> None:
        await self.persist(state, (), None)

    async def first_index(self) -> int:
        self._check_alive()
        return self._log[0].index if self._log else self._last() + 1

    async def last_index(self) -> int:
        self._check_alive()
        return self._last()

    def _last(self) -> int:
        if self._log:
            return self._log[-1].index
        return self._snapshot.meta.index if self._snapshot else 0

    async def entries(self, lo: int, hi: int) -> list[Entry]:
        self._check_alive()
        if not self._log:
            return []
        base = self._log[0].index
        return self._log[max(lo - base, 0) : max(hi - base, 0)]

    async def append(self, entries: Sequence[Entry]) -> None:
        await self.persist(None, entries, None)

    async def compact(self, upto: int) -> None:
        self._check_alive()
        self._log = [e for e in self._log if e.index > upto]

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.persist(None, (), snapshot)

    async def load_snapshot(self) -> Snapshot | None:
        self._check_alive()
        return self._snapshot

    async def persist(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        self._check_alive()
        check_write(entries, snapshot)
        # Build the new log first so a refused write leaves nothing half done, as a
        # Redis MULTI would.
        log = self._log
        stored_snapshot = self._snapshot
        if snapshot is not None:
            meta = snapshot.meta
            at_index = [e.term for e in log if e.index == meta.index]
            stored_meta = stored_snapshot.meta if stored_snapshot else None
            keep = snapshot_keeps_suffix(meta, at_index[0] if at_index else None, stored_meta)
            log = [e for e in log if e.index > meta.index] if keep else []
            stored_snapshot = snapshot
        if entries:
            log = self._spliced(log, entries, stored_snapshot)
        self._log = log
        self._snapshot = stored_snapshot
        if hard_state is not None:
            self._hard_state = hard_state
        self.persist_count += 1

    @staticmethod
    def _spliced(log: list[Entry], entries: Sequence[Entry], snap: Snapshot | None) -> list[Entry]:
        start = entries[0].index
        snapshot_index = snap.meta.index if snap else 0
        base = log[0].index if log else snapshot_index + 1
        if start < base:
            raise ValueError(f"entry {start} is before the first stored index {base}")
        if start > base + len(log):
            raise ValueError(f"entry {start} would leave a gap after {base + len(log) - 1}")
        return log[: start - base] + list(entries)


class InMemoryStateStore:
    """StateStore over a dict of hashes; like Redis, a hash with no fields does not exist."""

    def __init__(self) -> None:
        self._hashes: dict[str, dict[str, str]] = {}
        self._applied = 0
        self._crashed = False

    def crash(self) -> InMemoryStateStore:
        self._check_alive()
        self._crashed = True
        survivor = InMemoryStateStore()
        survivor._hashes = {k: dict(v) for k, v in self._hashes.items()}
        survivor._applied = self._applied
        return survivor

    def _check_alive(self) -> None:
        if self._crashed:
            raise StoreCrashedError("this store was replaced by crash()")

    async def load_applied_index(self) -> int:
        self._check_alive()
        return self._applied

    async def apply(self, writes: Sequence[HashWrite], applied_index: int) -> None:
        self._check_alive()
        for write in writes:
            keys.check_state_key(write.key)
        for write in writes:
            current = {} if write.drop else self._hashes.get(write.key, {})
            updated = {f: v for f, v in current.items() if f not in write.deleted}
            updated.update(write.fields)
            if updated:
                self._hashes[write.key] = updated
            else:
                self._hashes.pop(write.key, None)
        self._applied = applied_index

    async def load_prefix(self, prefix: str) -> dict[str, dict[str, str]]:
        self._check_alive()
        keys.check_state_prefix(prefix)
        return {k: dict(v) for k, v in self._hashes.items() if k.startswith(prefix)}

    async def replace_all(
        self,
        prefixes: Sequence[str],
        hashes: Mapping[str, Mapping[str, str]],
        applied_index: int,
    ) -> None:
        self._check_alive()
        keys.check_replacement(prefixes, hashes)
        under = tuple(prefixes)
        kept = {k: v for k, v in self._hashes.items() if not k.startswith(under)}
        kept.update({k: dict(v) for k, v in hashes.items() if v})
        self._hashes = kept
        self._applied = applied_index


def _conforms(
    raft: InMemoryRaftStorage, state: InMemoryStateStore
) -> tuple[RaftStorage, StateStore]:
    # Never called: mypy checks here that the classes satisfy the Protocols.
    return raft, state
