"""Raft's safety properties, checked incrementally while a simulation runs.

Every check raises `SafetyViolation` with a sentence naming the property; the simulator
adds the seed and the recent trace. The checks are incremental (each new log entry, commit,
application and election is checked once when it happens), which keeps "check after every
step" affordable for hundreds of seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.raft.core import RaftCore, Role
from service.raft.messages import Entry, HardState, ReadState, Snapshot
from tests.sim.disk import GENESIS


class SafetyViolation(AssertionError):
    pass


@dataclass(slots=True)
class NodeWatch:
    """What the checker remembers of one node across its restarts."""

    hard_state: HardState = field(default_factory=HardState)
    max_applied: int = 0
    commit: int = 0  # commit index of the current incarnation (reset on restart)
    term: int = 0  # in-memory term of the current incarnation


@dataclass(slots=True)
class _Read:
    node: str
    started_after_commit: int
    answered: bool = False


class Checker:
    def __init__(self, nodes: list[str]) -> None:
        self.watch: dict[str, NodeWatch] = {n: NodeWatch() for n in nodes}
        self.leaders_by_term: dict[int, str] = {}
        # (index, term) -> (kind, data, term of the previous entry): Log Matching by induction.
        self.log_ids: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        # index -> term of the committed entry at that index (from commits and applications).
        self.committed_term: dict[int, int] = {}
        self.max_commit = 0
        # index -> (term, kind, data) of what was applied there, and the state digest after it.
        self.applied: dict[int, tuple[int, int, bytes]] = {}
        self.digest_at: dict[int, bytes] = {0: GENESIS}
        self.reads: dict[int, _Read] = {}
        self.elections = 0
        self.reads_answered = 0
        self.snapshots_installed = 0

    # --- logs -----------------------------------------------------------------

    def on_new_entries(self, node: str, core: RaftCore, entries: list[Entry]) -> None:
        """Log Matching: an (index, term) pair names one entry and one history before it."""
        for entry in entries:
            prev_term = core.log.term_at(entry.index - 1)
            if prev_term is None:
                raise SafetyViolation(f"{node}: entry {entry.index} has no predecessor in its log")
            ident = (entry.index, entry.term)
            value = (int(entry.kind), entry.data, prev_term)
            seen = self.log_ids.setdefault(ident, value)
            if seen != value:
                raise SafetyViolation(
                    f"Log Matching: {node} holds entry {ident} as {value!r}, "
                    f"another log held it as {seen!r}"
                )
            if prev_term > entry.term:
                raise SafetyViolation(f"{node}: terms decrease in the log at {entry.index}")

    def on_snapshot(self, node: str, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        self._note_committed(node, meta.index, meta.term)
        expected = self.digest_at.get(meta.index)
        digest = snapshot.data.split(b":")[1]
        if expected is not None and bytes.fromhex(digest.decode()) != expected:
            raise SafetyViolation(
                f"State Machine Safety: {node}'s snapshot at {meta.index} differs from "
                "the state other nodes reached at that index"
            )

    # --- hard state -------------------------------------------------------------

    def on_persist_hard_state(self, node: str, hs: HardState) -> None:
        w = self.watch[node]
        old = w.hard_state
        if hs.term < old.term:
            raise SafetyViolation(f"{node}: durable term went back from {old.term} to {hs.term}")
        if hs.term == old.term and old.vote is not None and hs.vote != old.vote:
            raise SafetyViolation(
                f"{node}: changed its durable vote in term {hs.term} from {old.vote} to {hs.vote}"
            )
        w.hard_state = hs

    # --- per-turn state -----------------------------------------------------------

    def after_turn(self, node: str, core: RaftCore, leaders: list[tuple[str, RaftCore]]) -> None:
        w = self.watch[node]
        if core.term < w.term:
            raise SafetyViolation(f"{node}: term went back from {w.term} to {core.term}")
        w.term = core.term
        if core.commit < w.commit:
            raise SafetyViolation(
                f"{node}: commit index went back from {w.commit} to {core.commit}"
            )
        if core.commit > core.log.last_index:
            raise SafetyViolation(f"{node}: commit {core.commit} beyond its last index")
        if core.applied > core.commit:
            raise SafetyViolation(f"{node}: applied {core.applied} beyond commit {core.commit}")
        if core.role == Role.LEADER and self.leaders_by_term.get(core.term) != node:
            self._on_new_leader(node, core)
        if core.commit > w.commit:
            for index in range(max(w.commit, core.log.snapshot_index) + 1, core.commit + 1):
                term = core.log.term_at(index)
                assert term is not None
                self._note_committed(node, index, term)
                for lead_id, lead in leaders:
                    if lead.term >= core.term:
                        self._check_leader_has(lead_id, lead, index, term)
            w.commit = core.commit
            self.max_commit = max(self.max_commit, core.commit)

    def _on_new_leader(self, node: str, core: RaftCore) -> None:
        """Election Safety, then Leader Completeness for everything committed so far."""
        other = self.leaders_by_term.get(core.term)
        if other is not None:
            raise SafetyViolation(
                f"Election Safety: {node} and {other} both became leader in term {core.term}"
            )
        self.leaders_by_term[core.term] = node
        self.elections += 1
        for index in range(core.log.snapshot_index, self.max_commit + 1):
            term = self.committed_term.get(index)
            if term is not None:
                self._check_leader_has(node, core, index, term)

    def _check_leader_has(self, node: str, core: RaftCore, index: int, term: int) -> None:
        if index < core.log.snapshot_index:
            return  # compacted into the leader's snapshot (its digest is checked)
        have = core.log.term_at(index)
        if have != term:
            raise SafetyViolation(
                f"Leader Completeness: leader {node} of term {core.term} has term {have} at "
                f"index {index}, where an entry of term {term} was committed"
            )

    def _note_committed(self, node: str, index: int, term: int) -> None:
        seen = self.committed_term.setdefault(index, term)
        if seen != term:
            raise SafetyViolation(
                f"{node} committed term {term} at index {index}, where term {seen} was committed"
            )

    # --- applying -------------------------------------------------------------------

    def on_apply(self, node: str, entry: Entry, digest_after: bytes) -> None:
        """State Machine Safety: no two nodes apply different entries at one index."""
        value = (entry.term, int(entry.kind), entry.data)
        seen = self.applied.setdefault(entry.index, value)
        if seen != value:
            raise SafetyViolation(
                f"State Machine Safety: {node} applied {value!r} at index {entry.index}, "
                f"another node applied {seen!r}"
            )
        self._note_committed(node, entry.index, entry.term)
        known = self.digest_at.setdefault(entry.index, digest_after)
        if known != digest_after:
            raise SafetyViolation(
                f"State Machine Safety: {node}'s state after index {entry.index} differs "
                "from another node's"
            )
        w = self.watch[node]
        w.max_applied = max(w.max_applied, entry.index)

    def on_disk_lost(self, node: str, hs: HardState) -> None:
        """The node's disk is empty now, but for the hard state it is given: what it
        applied and persisted before is gone (the cluster must still have it)."""
        self.watch[node] = NodeWatch(hard_state=hs, term=hs.term)

    def on_restart(self, node: str, core: RaftCore, disk_applied: int) -> None:
        w = self.watch[node]
        if core.applied < w.max_applied:
            raise SafetyViolation(
                f"{node}: applied index went back across a restart ({w.max_applied} -> "
                f"{core.applied})"
            )
        if core.applied != disk_applied:
            raise SafetyViolation(
                f"{node}: restarted core says applied {core.applied}, its state machine "
                f"is at {disk_applied}"
            )
        if core.term != w.hard_state.term or core.vote != w.hard_state.vote:
            raise SafetyViolation(f"{node}: restarted with a hard state it never persisted")
        w.commit = core.commit
        w.term = core.term

    # --- linearizable reads ------------------------------------------------------------

    def on_read_started(self, ctx: int, node: str) -> None:
        self.reads[ctx] = _Read(node, self.max_commit)

    def on_read_state(self, node: str, core: RaftCore, rs: ReadState) -> None:
        read = self.reads.get(rs.ctx)
        if read is None or read.node != node:
            raise SafetyViolation(f"{node} answered read {rs.ctx} it was never asked")
        if read.answered:
            raise SafetyViolation(f"{node} answered read {rs.ctx} twice")
        read.answered = True
        self.reads_answered += 1
        if rs.index < read.started_after_commit:
            raise SafetyViolation(
                f"Linearizable reads: {node} answered read {rs.ctx} at index {rs.index}, but "
                f"index {read.started_after_commit} was committed before the read started"
            )
        if rs.index > core.commit:
            raise SafetyViolation(f"{node} answered a read at {rs.index} beyond its commit")
