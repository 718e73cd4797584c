"""Sans-IO Raft: a deterministic object driven by step(), tick() and propose().

No asyncio, Redis, clocks or global randomness live here. Time is counted in ticks and
randomness comes from an injected random.Random, so a simulation with a seed replays
exactly. The runner drains `ready()` (persist -> send -> apply) and then calls
`advance()`; nothing may be stepped between the two.

Implemented: randomized election timeouts, PreVote, CheckQuorum, log replication with
conflict repair and the current-term commit rule, a no-op entry on election, snapshots with
compaction and InstallSnapshot, ReadIndex, leadership transfer (TimeoutNow), and
single-server membership changes (a configuration takes effect when appended).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum

from service.raft.log import RaftLog
from service.raft.messages import (
    AppendRequest,
    AppendResponse,
    ClusterConfig,
    Entry,
    EntryKind,
    HardState,
    Message,
    NodeId,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)


class Role(Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class RaftError(Exception):
    """Base of the errors a caller of the core can act on."""


class NotLeader(RaftError):
    def __init__(self, leader: NodeId | None) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class TransferInProgress(RaftError):
    """Proposals pause while leadership is being handed over."""


class TooManyPending(RaftError):
    """Backpressure: too many proposed entries are not committed yet."""


class ConfigChangeRejected(RaftError):
    pass


@dataclass(frozen=True, slots=True)
class RaftConfig:
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    prevote: bool = True
    check_quorum: bool = True
    max_entries_per_message: int = 512
    max_bytes_per_message: int = 4 * 1024 * 1024
    max_uncommitted_entries: int = 50_000

    def __post_init__(self) -> None:
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")


@dataclass(slots=True)
class Progress:
    """What the leader knows about one follower's log."""

    match: int = 0
    next: int = 1
    recent_active: bool = False
    read_ack: int = 0  # highest ReadIndex heartbeat round this peer answered
    snapshot_pending_ticks: int = 0  # >0 while an InstallSnapshot is in flight


@dataclass(slots=True)
class _PendingRead:
    round: int
    ctx: int
    index: int


# The vote of a node that lost its storage, for the highest term its peers reported: it
# may have voted in that term before the loss, so it must not vote in it again. Not a
# valid node id (service/config.py), so it never matches a candidate.
ABSTAIN: NodeId = "!abstain"


@dataclass(slots=True)
class RaftStatus:
    node: NodeId
    role: Role
    term: int
    leader: NodeId | None
    commit_index: int
    applied_index: int
    last_index: int
    snapshot_index: int
    voters: tuple[NodeId, ...]
    progress: dict[NodeId, tuple[int, int, bool]] = field(default_factory=dict)
    rejoining: bool = False


class RaftCore:
    def __init__(
        self,
        node_id: NodeId,
        voters: tuple[NodeId, ...],
        rng: random.Random,
        config: RaftConfig | None = None,
        *,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: tuple[Entry, ...] | list[Entry] = (),
        applied: int = 0,
        rejoining: bool = False,
    ) -> None:
        """Create a node, or restore one from what its storage held.

        `voters` is the bootstrap configuration, used only when neither the snapshot nor
        the log holds a configuration. `applied` is the index the materialised state
        machine already reflects; everything up to it is known committed.

        `rejoining`: this node lost its storage and is back with an empty one (see
        `rejoining` below); the caller has also given it a hard state whose term is the
        highest any peer reported, with the vote ABSTAIN, so it cannot vote twice in a
        term it may have voted in before the loss.
        """
        self.id = node_id
        self.cfg = config or RaftConfig()
        self._rng = rng
        hs = hard_state or HardState()
        self.term = hs.term
        self.vote: NodeId | None = hs.vote
        self._persisted_hs = hs

        snap_index = snapshot.meta.index if snapshot else 0
        snap_term = snapshot.meta.term if snapshot else 0
        self.log = RaftLog(snap_index, snap_term, entries)
        self._snapshot = snapshot
        self._snapshot_to_persist: Snapshot | None = None
        self._base_voters = tuple(snapshot.meta.voters) if snapshot else tuple(voters)
        # (index, voters) of every configuration entry in the log after the snapshot.
        self._config_log: list[tuple[int, tuple[NodeId, ...]]] = []
        for entry in self.log.slice(self.log.first_index, self.log.last_index + 1):
            if entry.kind == EntryKind.CONFIG:
                self._config_log.append((entry.index, ClusterConfig.decode(entry.data).voters))

        if applied > self.log.last_index:
            raise ValueError(f"applied index {applied} beyond last log index {self.log.last_index}")
        self.commit = max(snap_index, applied)
        self.applied = self.commit

        # A node that lost its log may have been part of the majority that committed
        # entries nobody else still holds; while it lacks them, its vote could elect a
        # leader without them. So it grants no vote (nor PreVote) until its commit index
        # reaches the commit index of the first leader that contacts it (whose log holds
        # every committed entry: Leader Completeness).
        self.rejoining = rejoining
        self._rejoin_target: int | None = None

        self.role = Role.FOLLOWER
        self.leader: NodeId | None = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._randomized_timeout = self.cfg.election_ticks
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, Progress] = {}
        self._transferee: NodeId | None = None
        self._transfer_elapsed = 0
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._pending_reads: list[_PendingRead] = []
        self._waiting_reads: list[int] = []  # ctxs queued until this term's no-op commits
        self._read_round = 0
        self._term_start_index = 0  # index of this leader's no-op
        self._broadcast_pending = False
        self._reset_election_timer()

    # --- configuration ------------------------------------------------------

    @property
    def voters(self) -> tuple[NodeId, ...]:
        return self._config_log[-1][1] if self._config_log else self._base_voters

    @property
    def peers(self) -> tuple[NodeId, ...]:
        return tuple(v for v in self.voters if v != self.id)

    def _quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def _has_uncommitted_config(self) -> bool:
        return bool(self._config_log) and self._config_log[-1][0] > self.commit

    def _forget_configs_from(self, index: int) -> None:
        while self._config_log and self._config_log[-1][0] >= index:
            self._config_log.pop()

    def _note_appended(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        for entry in entries:
            if entry.kind == EntryKind.CONFIG:
                self._config_log.append((entry.index, ClusterConfig.decode(entry.data).voters))
        if self.role == Role.LEADER:
            self._sync_progress_with_config()

    def _sync_progress_with_config(self) -> None:
        for peer in self.peers:
            if peer not in self._progress:
                self._progress[peer] = Progress(next=self.log.last_index + 1)
        for gone in [p for p in self._progress if p not in self.peers]:
            del self._progress[gone]

    # --- inputs -------------------------------------------------------------

    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a command; returns (index, term). The caller learns the outcome when an
        entry with that index is applied: same term means it committed, another term means
        it was overwritten (the result is then unknown to the client, who may retry)."""
        return self._propose(EntryKind.NORMAL, data)

    def propose_config(self, voters: tuple[NodeId, ...]) -> tuple[int, int]:
        """Single-server membership change: voters may differ by exactly one node."""
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        current = set(self.voters)
        wanted = set(voters)
        if len(wanted) != len(voters) or not wanted:
            raise ConfigChangeRejected("voters must be distinct and non-empty")
        if len(current ^ wanted) != 1:
            raise ConfigChangeRejected("add or remove exactly one voter at a time")
        if self._has_uncommitted_config():
            raise ConfigChangeRejected("a membership change is still in progress")
        if self.commit < self._term_start_index:
            raise ConfigChangeRejected("the new leader has not committed its first entry yet")
        return self._propose(EntryKind.CONFIG, ClusterConfig(tuple(voters)).encode())

    def _propose(self, kind: EntryKind, data: bytes) -> tuple[int, int]:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if self._transferee is not None:
            raise TransferInProgress(f"leadership is moving to {self._transferee}")
        if self.log.last_index - self.commit >= self.cfg.max_uncommitted_entries:
            raise TooManyPending("too many uncommitted entries; retry later")
        entry = Entry(self.log.last_index + 1, self.term, kind, data)
        self.log.append([entry])
        self._note_appended([entry])
        self._broadcast_pending = True
        self._maybe_commit()  # a single-node cluster commits at once
        return entry.index, entry.term

    def read_index(self, ctx: int) -> None:
        """Ask for a linearizable read point; answered as a ReadState in a later Ready.

        Only the leader answers. It first commits an entry of its own term (so its commit
        index is current) and then confirms with a quorum that it is still the leader.
        """
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if self.commit < self._term_start_index:
            self._waiting_reads.append(ctx)
            return
        self._start_read(ctx)

    def _start_read(self, ctx: int) -> None:
        if self.voters == (self.id,):
            self._read_states.append(ReadState(ctx, self.commit))
            return
        self._read_round += 1
        self._pending_reads.append(_PendingRead(self._read_round, ctx, self.commit))
        for peer in self.peers:
            self._send_heartbeat(peer)

    def transfer_leadership(self, target: NodeId) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if target == self.id or target not in self.voters:
            raise ConfigChangeRejected(f"cannot transfer leadership to {target!r}")
        self._transferee = target
        self._transfer_elapsed = 0
        pr = self._progress[target]
        if pr.match == self.log.last_index:
            self._send(TimeoutNow(self.term, self.id, target))
        else:
            self._send_append(target)

    def compact(self, snapshot: Snapshot) -> None:
        """The runner took (and persisted) a snapshot at an applied index: drop the log
        before it and keep the snapshot to send to followers that fall behind."""
        if snapshot.meta.index > self.applied:
            raise ValueError("snapshot beyond the applied index")
        if snapshot.meta.index <= self.log.snapshot_index:
            return
        self._forget_configs_up_to(snapshot.meta.index)
        self._base_voters = snapshot.meta.voters
        self.log.compact(snapshot.meta.index, snapshot.meta.term)
        self._snapshot = snapshot

    def _forget_configs_up_to(self, index: int) -> None:
        self._config_log = [(i, v) for i, v in self._config_log if i > index]

    def snapshot_meta(self, index: int) -> SnapshotMeta:
        """Metadata for a snapshot of the state machine at an applied index."""
        term = self.log.term_at(index)
        if term is None or index > self.applied:
            raise ValueError(f"no applied entry at {index}")
        voters = self._base_voters
        for i, v in self._config_log:
            if i <= index:
                voters = v
        return SnapshotMeta(index, term, voters)

    # --- output -------------------------------------------------------------

    def has_ready(self) -> bool:
        return (
            self._broadcast_pending
            or bool(self._msgs)
            or bool(self._read_states)
            or self._snapshot_to_persist is not None
            or self.log.unstable_from <= self.log.last_index
            or self.commit > self.applied
            or self._hard_state() != self._persisted_hs
        )

    def ready(self) -> Ready:
        if self._broadcast_pending:
            self._broadcast_pending = False
            for peer in self.peers:
                self._send_append(peer)
        hs = self._hard_state()
        entries = self.log.unstable()
        rd = Ready(
            hard_state=hs if hs != self._persisted_hs else None,
            entries=entries,
            snapshot=self._snapshot_to_persist,
            messages=self._msgs,
            committed=self.log.slice(self.applied + 1, self.commit + 1)
            if self.commit > self.applied
            else [],
            read_states=self._read_states,
        )
        rd.must_sync = rd.hard_state is not None or bool(rd.entries) or rd.snapshot is not None
        self._msgs = []
        self._read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        if rd.hard_state is not None:
            self._persisted_hs = rd.hard_state
        if rd.snapshot is not None and self._snapshot_to_persist is rd.snapshot:
            self._snapshot_to_persist = None
        if rd.entries:
            self.log.mark_stable(rd.entries[-1].index)
        if rd.committed:
            self.applied = max(self.applied, rd.committed[-1].index)
        if rd.entries and self.role == Role.LEADER:
            self._maybe_commit()  # our own copy now counts

    def status(self) -> RaftStatus:
        progress = {
            peer: (pr.match, pr.next, pr.recent_active) for peer, pr in self._progress.items()
        }
        return RaftStatus(
            node=self.id,
            role=self.role,
            term=self.term,
            leader=self.leader,
            commit_index=self.commit,
            applied_index=self.applied,
            last_index=self.log.last_index,
            snapshot_index=self.log.snapshot_index,
            voters=self.voters,
            progress=progress,
            rejoining=self.rejoining,
        )

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote)

    # --- role transitions ---------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_election_timer()
        self._votes = {}
        self._transferee = None
        self._pending_reads = []
        self._waiting_reads = []
        # A broadcast owed by the leader we were dies with that leadership: sent later, it
        # would carry the new term and make followers take us for that term's leader.
        self._broadcast_pending = False

    def _reset_election_timer(self) -> None:
        base = self.cfg.election_ticks
        self._randomized_timeout = base + self._rng.randrange(base)

    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_pre_candidate(self) -> None:
        # PreVote: ask whether we could win before disturbing anyone's term (§9.6).
        self._votes = {}
        self.role = Role.PRE_CANDIDATE
        self.leader = None

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        self._progress = {}
        self._sync_progress_with_config()
        for pr in self._progress.values():
            pr.recent_active = True  # give every follower one full CheckQuorum period
        # A no-op of our own term lets us commit (and learn the commit index of) entries
        # from earlier terms, which the current-term commit rule forbids counting alone.
        noop = Entry(self.log.last_index + 1, self.term, EntryKind.NOOP)
        self.log.append([noop])
        self._note_appended([noop])
        self._term_start_index = noop.index
        self._broadcast_pending = True
        self._maybe_commit()

    # --- elections ----------------------------------------------------------

    def _promotable(self) -> bool:
        # A rejoining node (see __init__) cannot win without the entries it lacks, and
        # its campaigns would only push terms up: it waits to be caught up.
        return self.id in self.voters and not self.rejoining

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self._randomized_timeout and self._promotable():
            self.election_elapsed = 0
            self._reset_election_timer()
            self._campaign(prevote=self.cfg.prevote, transfer=False)

    def _campaign(self, *, prevote: bool, transfer: bool) -> None:
        if prevote:
            self._become_pre_candidate()
            request_term = self.term + 1
        else:
            self._become_candidate()
            request_term = self.term
        self._votes[self.id] = True
        if self._tally() >= self._quorum():
            self._on_election_won(prevote)
            return
        for peer in self.peers:
            self._send(
                VoteRequest(
                    request_term,
                    self.id,
                    peer,
                    self.log.last_index,
                    self.log.last_term,
                    prevote=prevote,
                    transfer=transfer,
                )
            )

    def _tally(self) -> int:
        return sum(1 for granted in self._votes.values() if granted)

    def _on_election_won(self, prevote: bool) -> None:
        if prevote:
            self._campaign(prevote=False, transfer=False)
        else:
            self._become_leader()

    def _in_lease(self) -> bool:
        """True while we heard from a live leader within the minimum election timeout:
        with CheckQuorum, such a node ignores vote requests so a partitioned node that
        rejoins cannot depose a healthy leader."""
        return (
            self.cfg.check_quorum
            and self.leader is not None
            and self.election_elapsed < self.cfg.election_ticks
        )

    def _handle_vote_request(self, m: VoteRequest) -> None:
        if self.rejoining:
            self._send(VoteResponse(self.term, self.id, m.src, False, m.prevote))
            return
        up_to_date = self.log.is_up_to_date(m.last_log_index, m.last_log_term)
        if m.prevote:
            grant = m.term > self.term and up_to_date
            # A granted PreVote echoes the asked term so the asker does not take it as news.
            self._send(VoteResponse(m.term if grant else self.term, self.id, m.src, grant, True))
            return
        can_vote = self.vote == m.src or (self.vote is None and self.leader is None)
        grant = m.term == self.term and can_vote and up_to_date
        if grant:
            self.vote = m.src
            self.election_elapsed = 0
        self._send(VoteResponse(self.term, self.id, m.src, grant, False))

    def _handle_vote_response(self, m: VoteResponse) -> None:
        if m.src not in self.voters:
            return  # only a majority of the configuration elects (e.g. a late PreVote answer)
        if m.prevote:
            if self.role != Role.PRE_CANDIDATE or m.term != self.term + 1:
                return
        elif self.role != Role.CANDIDATE or m.term != self.term:
            return
        self._votes.setdefault(m.src, m.granted)
        if self._tally() >= self._quorum():
            self._on_election_won(m.prevote)
        elif len(self._votes) - self._tally() >= self._quorum():
            self._become_follower(self.term, None)

    # --- step ---------------------------------------------------------------

    def step(self, m: Message) -> None:
        if m.dst != self.id:
            return
        if m.term > self.term:
            if isinstance(m, VoteRequest):
                if not m.transfer and self._in_lease():
                    return
                if m.prevote:
                    self._handle_vote_request(m)
                    return
                self._become_follower(m.term, None)
            elif isinstance(m, VoteResponse) and m.prevote and m.granted:
                pass  # echo of the term we asked about, not a newer term
            elif isinstance(m, AppendRequest | SnapshotRequest | TimeoutNow):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            self._step_stale(m)
            return

        if isinstance(m, VoteRequest):
            self._handle_vote_request(m)
        elif isinstance(m, VoteResponse):
            self._handle_vote_response(m)
        elif isinstance(m, AppendRequest):
            self._on_leader_contact(m.src)
            self._handle_append(m)
            self._note_rejoin_progress(m.commit)
        elif isinstance(m, SnapshotRequest):
            self._on_leader_contact(m.src)
            self._handle_snapshot(m)
            self._note_rejoin_progress(m.snapshot.meta.index)
        elif isinstance(m, AppendResponse):
            self._handle_append_response(m)
        elif isinstance(m, SnapshotResponse):
            self._handle_snapshot_response(m)
        elif isinstance(m, TimeoutNow) and self._promotable():
            self._campaign(prevote=False, transfer=True)

    def _step_stale(self, m: Message) -> None:
        # A deposed leader (or a node that was partitioned away) learns the newer term
        # from our answer and steps down. Vote requests are refused with our term (§5.1):
        # a candidate nobody with a newer term answers may never learn it, and keep
        # campaigning in a term the others have left (seen without PreVote).
        if isinstance(m, AppendRequest):
            self._send(AppendResponse(self.term, self.id, m.src, False, 0, m.read_ctx))
        elif isinstance(m, SnapshotRequest):
            self._send(SnapshotResponse(self.term, self.id, m.src, 0))
        elif isinstance(m, VoteRequest):
            self._send(VoteResponse(self.term, self.id, m.src, False, m.prevote))

    def _note_rejoin_progress(self, leader_commit: int) -> None:
        if not self.rejoining:
            return
        if self._rejoin_target is None:
            self._rejoin_target = leader_commit
        if self.commit >= self._rejoin_target:
            self.rejoining = False  # caught up: a vote here is as informed as anyone's

    def _on_leader_contact(self, leader: NodeId) -> None:
        if self.role != Role.FOLLOWER:
            self._become_follower(self.term, leader)
        self.leader = leader
        self.election_elapsed = 0

    # --- follower side ------------------------------------------------------

    def _handle_append(self, m: AppendRequest) -> None:
        prev_index, prev_term, entries = m.prev_index, m.prev_term, m.entries
        if prev_index < self.commit:
            # Everything up to our commit index is in the leader's log already (Leader
            # Completeness), so only what lies beyond it needs checking.
            entries = tuple(e for e in entries if e.index > self.commit)
            prev_index = self.commit
            prev_term_here = self.log.term_at(prev_index)
            assert prev_term_here is not None
            prev_term = prev_term_here
        local_term = self.log.term_at(prev_index)
        if local_term != prev_term:
            if local_term is None:
                hint = self.log.last_index + 1
            else:
                hint = self.log.first_index_of_term(prev_index, self.commit)
            self._send(
                AppendResponse(
                    self.term, self.id, m.src, False, hint, m.read_ctx, log_lost=self.rejoining
                )
            )
            return
        truncated, added = self.log.merge(entries)
        if truncated:
            self._forget_configs_from(truncated)
        self._note_appended(added)
        last_new = prev_index + len(entries)
        if m.commit > self.commit:
            self.commit = max(self.commit, min(m.commit, last_new))
        self._send(AppendResponse(self.term, self.id, m.src, True, last_new, m.read_ctx))

    def _handle_snapshot(self, m: SnapshotRequest) -> None:
        meta = m.snapshot.meta
        if meta.index <= self.commit:
            self._send(SnapshotResponse(self.term, self.id, m.src, self.commit))
            return
        if self.log.term_at(meta.index) == meta.term:
            # We already hold that prefix: just learn it is committed.
            self.commit = meta.index
            self._send(SnapshotResponse(self.term, self.id, m.src, meta.index))
            return
        self.log.restore(meta.index, meta.term)
        self._config_log = []
        self._base_voters = meta.voters
        self._snapshot = m.snapshot
        self._snapshot_to_persist = m.snapshot
        self.commit = meta.index
        self.applied = meta.index  # the runner loads the snapshot into the state machine
        self._send(SnapshotResponse(self.term, self.id, m.src, meta.index))

    # --- leader side --------------------------------------------------------

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        for pr in self._progress.values():
            if pr.snapshot_pending_ticks > 0:
                pr.snapshot_pending_ticks -= 1
        if self._transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self.cfg.election_ticks:
                self._transferee = None  # the target did not take over in time: abort
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                self._become_follower(self.term, None)
                return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            for peer in self.peers:
                self._send_heartbeat(peer)

    def _quorum_active(self) -> bool:
        active = 1 if self.id in self.voters else 0
        for pr in self._progress.values():
            if pr.recent_active:
                active += 1
            pr.recent_active = False
        return active >= self._quorum()

    def _send_heartbeat(self, peer: NodeId) -> None:
        pr = self._progress[peer]
        if pr.next <= self.log.last_index or pr.next - 1 < self.log.snapshot_index:
            self._send_append(peer, read_ctx=self._read_round)
            return
        prev = pr.next - 1
        prev_term = self.log.term_at(prev)
        assert prev_term is not None
        self._send(
            AppendRequest(
                self.term, self.id, peer, prev, prev_term, (), self.commit, self._read_round
            )
        )

    def _send_append(self, peer: NodeId, read_ctx: int = 0) -> None:
        pr = self._progress[peer]
        prev = pr.next - 1
        prev_term = self.log.term_at(prev)
        if prev_term is None or prev < self.log.snapshot_index:
            self._send_snapshot(peer)
            return
        entries = self._batch_from(pr.next)
        self._send(
            AppendRequest(
                self.term, self.id, peer, prev, prev_term, tuple(entries), self.commit, read_ctx
            )
        )
        if entries:
            pr.next = entries[-1].index + 1  # optimistic: a rejection moves it back

    def _batch_from(self, lo: int) -> list[Entry]:
        batch: list[Entry] = []
        size = 0
        for entry in self.log.slice(lo, lo + self.cfg.max_entries_per_message):
            size += len(entry.data) + 16
            if batch and size > self.cfg.max_bytes_per_message:
                break
            batch.append(entry)
        return batch

    def _send_snapshot(self, peer: NodeId) -> None:
        pr = self._progress[peer]
        if self._snapshot is None or pr.snapshot_pending_ticks > 0:
            return
        pr.snapshot_pending_ticks = self.cfg.election_ticks
        self._send(SnapshotRequest(self.term, self.id, peer, self._snapshot))

    def _handle_append_response(self, m: AppendResponse) -> None:
        if self.role != Role.LEADER or m.src not in self._progress:
            return
        pr = self._progress[m.src]
        pr.recent_active = True
        if m.read_ctx:
            pr.read_ack = max(pr.read_ack, m.read_ctx)
            self._release_reads()
        if not m.success:
            if m.log_lost:
                # Its log is gone, whatever it acknowledged before: a match index never
                # goes back otherwise, so without this the leader would keep probing
                # above an empty log forever.
                pr.match = 0
            pr.next = max(pr.match + 1, min(m.match_index, pr.next))
            pr.next = max(pr.next, 1)
            self._send_append(m.src)
            return
        if m.match_index > pr.match:
            pr.match = m.match_index
            pr.next = max(pr.next, pr.match + 1)
            pr.snapshot_pending_ticks = 0
            self._maybe_commit()
        if self._transferee == m.src and pr.match == self.log.last_index:
            self._send(TimeoutNow(self.term, self.id, m.src))
        elif pr.next <= self.log.last_index:
            self._send_append(m.src)

    def _handle_snapshot_response(self, m: SnapshotResponse) -> None:
        if self.role != Role.LEADER or m.src not in self._progress:
            return
        pr = self._progress[m.src]
        pr.recent_active = True
        pr.snapshot_pending_ticks = 0
        if m.match_index > pr.match:
            pr.match = m.match_index
            self._maybe_commit()
        pr.next = max(pr.next, pr.match + 1)
        if pr.next <= self.log.last_index:
            self._send_append(m.src)

    def _maybe_commit(self) -> None:
        # The leader counts itself only for what it has persisted (thesis 10.2.1): the
        # runner may send AppendEntries before its own write of them completes, so an
        # entry in memory here could otherwise commit with one durable copy.
        stable = min(self.log.last_index, self.log.unstable_from - 1)
        matches = sorted(
            [stable if self.id in self.voters else 0]
            + [self._progress[p].match for p in self.peers],
            reverse=True,
        )
        candidate = matches[self._quorum() - 1]
        # §5.4.2: only an entry of the current term is committed by counting replicas.
        if candidate > self.commit and self.log.term_at(candidate) == self.term:
            self.commit = candidate
            self._broadcast_pending = True  # followers learn the new commit index promptly
            self._on_commit_advanced()

    def _on_commit_advanced(self) -> None:
        if self.commit >= self._term_start_index and self._waiting_reads:
            waiting, self._waiting_reads = self._waiting_reads, []
            for ctx in waiting:
                self._start_read(ctx)
        if self.id not in self.voters and not self._has_uncommitted_config():
            # We committed our own removal: hand over by stepping down.
            self._become_follower(self.term, None)

    def _release_reads(self) -> None:
        if not self._pending_reads:
            return
        acks = [self._progress[p].read_ack for p in self.peers]
        if self.id in self.voters:
            # A leader that is removing itself does not count itself in majorities.
            acks.append(self._read_round)
        acks.sort(reverse=True)
        confirmed = acks[self._quorum() - 1]
        done = [r for r in self._pending_reads if r.round <= confirmed]
        self._pending_reads = [r for r in self._pending_reads if r.round > confirmed]
        self._read_states.extend(ReadState(r.ctx, r.index) for r in done)

    def _send(self, m: Message) -> None:
        self._msgs.append(m)
