"""Unit tests of the sans-IO Raft core, each phrased as a sentence of the Raft paper
(Ongaro & Ousterhout, "In Search of an Understandable Consensus Algorithm", 2014) or of
Ongaro's thesis ("Consensus: Bridging Theory and Practice", 2014).

Cores are driven by hand through their public API (step, tick, propose, ready, advance). The
`Net` below plays the runner: it persists each Ready to an in-memory `Disk`, queues its
messages and delivers them only when a test asks, so every interleaving is explicit. Every
Ready handled is checked against the Ready contract (`check_ready_contract`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from service.raft.core import (
    ABSTAIN,
    ConfigChangeRejected,
    NotLeader,
    RaftConfig,
    RaftCore,
    Role,
    TransferInProgress,
)
from service.raft.messages import (
    AppendRequest,
    AppendResponse,
    Entry,
    EntryKind,
    HardState,
    Message,
    ReadState,
    Ready,
    Snapshot,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

ELECTION = 10
HEARTBEAT = 2
CFG = RaftConfig(election_ticks=ELECTION, heartbeat_ticks=HEARTBEAT)


def e(index: int, term: int, data: bytes = b"") -> Entry:
    return Entry(index, term, EntryKind.NORMAL, data or b"e%d" % index)


# --- a hand-driven runner ---------------------------------------------------------------


@dataclass
class Disk:
    """What one node's storage holds: exactly what its Readies asked to persist."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)
    applied: list[Entry] = field(default_factory=list)
    applied_index: int = 0

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.meta.index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot_index

    def term_at(self, index: int) -> int | None:
        if self.snapshot is not None and index == self.snapshot.meta.index:
            return self.snapshot.meta.term
        for entry in self.entries:
            if entry.index == index:
                return entry.term
        return None

    def save_snapshot(self, snapshot: Snapshot) -> None:
        keep = self.term_at(snapshot.meta.index) == snapshot.meta.term
        self.entries = [x for x in self.entries if keep and x.index > snapshot.meta.index]
        self.snapshot = snapshot

    def write(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.save_snapshot(rd.snapshot)
        if rd.entries:
            first = rd.entries[0].index
            assert self.snapshot_index < first <= self.last_index + 1, "gap in the durable log"
            self.entries = [x for x in self.entries if x.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state


def check_ready_contract(node: str, rd: Ready, disk: Disk) -> None:
    """A message may only promise what the same Ready makes durable first: its term (and a
    vote it carries) is in the hard state, and entries it acknowledges are in the log.

    A Ready gathers everything since the last one, so a message may carry an older term
    than the hard state (the node moved on after sending it); it never carries a newer one.
    """
    hs = disk.hard_state
    assert rd.must_sync == (rd.hard_state is not None or bool(rd.entries) or bool(rd.snapshot))
    for m in rd.messages:
        assert m.src == node
        if isinstance(m, VoteRequest) and m.prevote:
            assert m.term <= hs.term + 1, "a PreVote asks about the next term, changes nothing"
            continue
        if isinstance(m, VoteResponse) and m.prevote and m.granted:
            continue  # echoes the term asked about; our own term did not change
        assert m.term <= hs.term, f"{node} sent {m} before persisting term {m.term}"
        if isinstance(m, VoteRequest) and m.term == hs.term:
            assert hs.vote == node, "a candidate's vote for itself is durable before it asks"
        if isinstance(m, VoteResponse) and m.granted and m.term == hs.term:
            assert hs.vote == m.dst, "a granted vote is durable before it is sent"
        if isinstance(m, AppendResponse) and m.success:
            assert disk.last_index >= m.match_index, "acknowledged entries are durable"
        if isinstance(m, SnapshotResponse):
            assert disk.last_index >= m.match_index
    for entry in rd.committed:
        assert disk.term_at(entry.index) == entry.term, "only durable entries are applied"


class Net:
    """Raft cores wired together by hand. Nothing moves unless a test says so."""

    def __init__(
        self,
        ids: Iterable[str] = ("a", "b", "c"),
        *,
        voters: Iterable[str] | None = None,
        logs: dict[str, list[Entry]] | None = None,
        term: int = 0,
        config: RaftConfig = CFG,
        seed: int = 1,
    ) -> None:
        self.ids = list(ids)
        self.voters = tuple(voters) if voters is not None else tuple(self.ids)
        self.config = config
        self.rng = random.Random(seed)
        self.disks = {i: Disk(hard_state=HardState(term)) for i in self.ids}
        for node, entries in (logs or {}).items():
            self.disks[node].entries = list(entries)
        self.cores: dict[str, RaftCore] = {}
        self.queue: list[Message] = []
        self.sent: list[Message] = []
        self.cut: set[tuple[str, str]] = set()
        self.readies: dict[str, list[Ready]] = {i: [] for i in self.ids}
        self.read_states: dict[str, list[ReadState]] = {i: [] for i in self.ids}
        for node in self.ids:
            self.start(node)

    # lifecycle

    def start(self, node: str, *, rejoining: bool = False) -> RaftCore:
        disk = self.disks[node]
        core = RaftCore(
            node,
            self.voters,
            random.Random(self.rng.getrandbits(32)),
            self.config,
            hard_state=disk.hard_state,
            snapshot=disk.snapshot,
            entries=tuple(disk.entries),
            applied=disk.applied_index,
            rejoining=rejoining,
        )
        self.cores[node] = core
        return core

    def lose_disk(self, node: str, peer_term: int) -> RaftCore:
        """The node comes back with empty storage; as the node runtime does, it is given
        the highest term its peers report with the ABSTAIN vote, and rejoins."""
        self.cores.pop(node, None)
        self.disks[node] = Disk(hard_state=HardState(peer_term, ABSTAIN))
        return self.start(node, rejoining=True)

    def crash(self, node: str) -> None:
        del self.cores[node]

    def restart(self, node: str) -> RaftCore:
        self.cores.pop(node, None)
        return self.start(node)

    # the runner's loop: persist -> send -> apply -> advance

    def handle(self, node: str) -> Ready:
        core = self.cores[node]
        rd = core.ready()
        disk = self.disks[node]
        disk.write(rd)
        check_ready_contract(node, rd, disk)
        self.queue.extend(rd.messages)
        self.sent.extend(rd.messages)
        if rd.snapshot is not None:
            disk.applied_index = rd.snapshot.meta.index
        for entry in rd.committed:
            assert entry.index == disk.applied_index + 1, "entries apply in order, once"
            disk.applied_index = entry.index
            disk.applied.append(entry)
        self.read_states[node].extend(rd.read_states)
        self.readies[node].append(rd)
        core.advance(rd)
        assert not core.has_ready(), "advance() left work behind"
        return rd

    def flush(self) -> None:
        for node in self.ids:
            if node in self.cores and self.cores[node].has_ready():
                self.handle(node)

    def deliver(self, drop: Callable[[Message], bool] | None = None) -> None:
        """Handle every Ready and deliver every message (and all they cause) until quiet."""
        for _ in range(1000):
            self.flush()
            if not self.queue:
                return
            batch, self.queue = self.queue, []
            for m in batch:
                if m.dst not in self.cores or (m.src, m.dst) in self.cut:
                    continue
                if drop is not None and drop(m):
                    continue
                self.cores[m.dst].step(m)
        raise AssertionError("messages kept flowing")

    # time and partitions

    def tick_all(self, ticks: int = 1, drop: Callable[[Message], bool] | None = None) -> None:
        for _ in range(ticks):
            for node in self.ids:
                if node in self.cores:
                    self.cores[node].tick()
            self.deliver(drop)

    def isolate(self, node: str) -> None:
        self.cut |= {(node, x) for x in self.ids if x != node}
        self.cut |= {(x, node) for x in self.ids if x != node}

    def heal(self) -> None:
        self.cut = set()

    def campaign(self, node: str) -> RaftCore:
        """Tick one node (only) until its election timer fires."""
        core = self.cores[node]
        for _ in range(2 * ELECTION):
            core.tick()
            if core.role != Role.FOLLOWER:
                return core
        raise AssertionError(f"{node} never started an election")

    def elect(self, node: str) -> RaftCore:
        """Let only `node`'s timer fire until it wins (a first try may just teach it the
        current term)."""
        for _ in range(3):
            core = self.campaign(node)
            self.deliver()
            if core.role == Role.LEADER:
                return core
        raise AssertionError(f"{node} did not win: {core.role}")

    def sent_to(self, node: str, kind: type) -> list[Message]:
        return [m for m in self.sent if m.dst == node and isinstance(m, kind)]


def role(core: RaftCore) -> Role:
    """The core's role, read through a call so a type checker does not narrow it across
    the steps that change it."""
    return core.role


def ticks_until_vote_request(core: RaftCore) -> int:
    for ticks in range(1, 3 * ELECTION):
        core.tick()
        rd = core.ready()
        core.advance(rd)
        if any(isinstance(m, VoteRequest) for m in rd.messages):
            return ticks
    raise AssertionError("no election started")


# --- §5.2 leader election ---------------------------------------------------------------


def test_election_timeouts_are_chosen_randomly_from_a_fixed_interval_T_to_2T():
    """§5.2: "Raft uses randomized election timeouts ... election timeouts are chosen
    randomly from a fixed interval"; here [T, 2T) with T = election_ticks."""
    first = set()
    again = set()
    for seed in range(200):
        core = RaftCore("a", ("a", "b", "c"), random.Random(seed), CFG)
        first.add(ticks_until_vote_request(core))
        # "Each candidate restarts its randomized election timeout at the start of an
        # election, and it waits for that timeout to elapse before starting the next one."
        again.add(ticks_until_vote_request(core))
    assert first == set(range(ELECTION, 2 * ELECTION))
    assert again == set(range(ELECTION, 2 * ELECTION))


def test_a_server_remains_follower_as_long_as_it_receives_heartbeats():
    """§5.2: "A server remains in follower state as long as it receives valid RPCs from a
    leader or candidate." """
    net = Net()
    leader = net.elect("a")
    net.tick_all(10 * ELECTION)
    assert leader.role == Role.LEADER
    assert all(net.cores[n].role == Role.FOLLOWER for n in ("b", "c"))
    assert {net.cores[n].term for n in net.ids} == {leader.term}


def test_a_server_votes_for_at_most_one_candidate_per_term_first_come_first_served():
    """§5.2: "Each server will vote for at most one candidate in a given term, on a
    first-come-first-served basis." Figure 2: votedFor is persistent state."""
    net = Net()
    c = net.cores["c"]
    c.step(VoteRequest(1, "a", "c", 0, 0))
    c.step(VoteRequest(1, "b", "c", 0, 0))
    rd = net.handle("c")
    granted = [m.dst for m in rd.messages if isinstance(m, VoteResponse) and m.granted]
    assert granted == ["a"]
    # The vote survives a restart: the same request from b is still refused.
    c = net.restart("c")
    c.step(VoteRequest(1, "b", "c", 0, 0))
    rd = net.handle("c")
    assert [m.granted for m in rd.messages if isinstance(m, VoteResponse)] == [False]


def test_a_voter_denies_a_candidate_whose_log_is_less_up_to_date():
    """§5.4.1: "The voter denies its vote if its own log is more up-to-date than that of
    the candidate" (last term first, then length)."""
    net = Net(logs={"c": [e(1, 1), e(2, 2)]}, term=2)
    c = net.cores["c"]
    c.step(VoteRequest(3, "a", "c", last_log_index=5, last_log_term=1))  # longer, older
    c.step(VoteRequest(4, "b", "c", last_log_index=1, last_log_term=2))  # same term, shorter
    rd = net.handle("c")
    assert [m.granted for m in rd.messages if isinstance(m, VoteResponse)] == [False, False]
    c.step(VoteRequest(5, "b", "c", last_log_index=2, last_log_term=2))  # as new as ours
    rd = net.handle("c")
    assert [m.granted for m in rd.messages if isinstance(m, VoteResponse)] == [True]


def test_a_vote_request_with_a_stale_term_is_refused_and_the_candidate_learns_the_term():
    """§5.1: "If a server receives a request with a stale term number, it rejects the
    request"; Figure 2: "Reply false if term < currentTerm", and "If RPC request or
    response contains term T > currentTerm: set currentTerm = T, convert to follower"."""
    net = Net(config=RaftConfig(election_ticks=ELECTION, heartbeat_ticks=HEARTBEAT, prevote=False))
    net.disks["b"].hard_state = HardState(5)
    net.disks["c"].hard_state = HardState(5)
    net.restart("b")
    net.restart("c")
    a = net.campaign("a")
    assert (role(a), a.term) == (Role.CANDIDATE, 1)
    net.deliver()
    refusals = [m for m in net.sent if isinstance(m, VoteResponse) and m.dst == "a"]
    assert {(m.src, m.term, m.granted) for m in refusals} == {("b", 5, False), ("c", 5, False)}
    assert (role(a), a.term) == (Role.FOLLOWER, 5)
    # Having learned the term, a can now be elected (its log is as new as anyone's).
    assert net.elect("a").term == 6


def test_a_candidate_wins_only_with_votes_from_a_majority_of_the_configuration():
    """§5.2: "A candidate wins an election if it receives votes from a majority of the
    servers in the full cluster for the same term": a vote from a server outside the
    configuration does not count."""
    net = Net(config=RaftConfig(election_ticks=ELECTION, heartbeat_ticks=HEARTBEAT, prevote=False))
    a = net.campaign("a")
    assert role(a) == Role.CANDIDATE
    a.step(VoteResponse(a.term, "z", "a", granted=True))
    assert role(a) == Role.CANDIDATE
    a.step(VoteResponse(a.term, "b", "a", granted=True))
    assert role(a) == Role.LEADER


# --- PreVote and CheckQuorum (thesis §9.6, §6.2) ----------------------------------------


def test_prevote_a_partitioned_server_does_not_increase_its_term():
    """Thesis §9.6: "Only if the candidate believed it could get votes from a majority of
    the cluster would it increment its term and start a normal election." A server cut off
    from the others keeps its term however often its timer fires."""
    net = Net()
    leader = net.elect("a")
    term = leader.term
    net.isolate("c")
    net.tick_all(10 * ELECTION)
    c = net.cores["c"]
    assert c.term == term
    prevotes = [m for m in net.sent if isinstance(m, VoteRequest) and m.src == "c"]
    assert prevotes and all(m.prevote for m in prevotes)
    assert leader.role == Role.LEADER and leader.term == term


def test_prevote_a_rejoining_server_does_not_disrupt_a_stable_leader():
    """Thesis §9.6: PreVote stops a server that rejoins after a partition from disrupting
    the cluster: its term did not grow, the followers still hear the leader, and it simply
    becomes a follower of the current leader again."""
    net = Net()
    leader = net.elect("a")
    term = leader.term
    net.isolate("c")
    net.tick_all(5 * ELECTION)
    leader.propose(b"while c was away")
    net.heal()
    net.tick_all(5 * ELECTION)
    c = net.cores["c"]
    assert leader.role == Role.LEADER and leader.term == term
    assert c.role == Role.FOLLOWER and c.leader == "a" and c.term == term
    assert c.log.last_index == leader.log.last_index


def test_without_prevote_a_partitioned_server_does_increase_its_term():
    """The contrast that shows the PreVote test above is not vacuous."""
    net = Net(config=RaftConfig(election_ticks=ELECTION, heartbeat_ticks=HEARTBEAT, prevote=False))
    leader = net.elect("a")
    net.isolate("c")
    net.tick_all(5 * ELECTION)
    assert net.cores["c"].term > leader.term


def test_a_follower_that_recently_heard_from_the_leader_ignores_vote_requests():
    """Thesis §4.2.3: "if a server receives a RequestVote request within the minimum
    election timeout of hearing from a current leader, it does not update its term or
    grant its vote." """
    net = Net()
    leader = net.elect("a")
    b = net.cores["b"]
    b.step(VoteRequest(leader.term + 1, "c", "b", last_log_index=99, last_log_term=99))
    rd = net.handle("b") if b.has_ready() else Ready()
    assert b.term == leader.term and b.vote != "c"
    assert not any(isinstance(m, VoteResponse) and m.granted for m in rd.messages)


def test_check_quorum_a_leader_that_hears_from_no_majority_steps_down():
    """Thesis §6.2: "a leader steps down if an election timeout elapses without a
    successful round of heartbeats to a majority of its cluster." """
    net = Net()
    leader = net.elect("a")
    term = leader.term
    net.isolate("a")
    ticks = 0
    while leader.role == Role.LEADER and ticks < 3 * ELECTION:
        net.tick_all()
        ticks += 1
    assert leader.role == Role.FOLLOWER and leader.term == term
    assert ticks <= 2 * ELECTION  # at the second CheckQuorum at the latest


def test_check_quorum_a_leader_that_hears_from_a_majority_stays_leader():
    net = Net()
    leader = net.elect("a")
    net.isolate("c")
    net.tick_all(10 * ELECTION)
    assert leader.role == Role.LEADER


# --- §5.3 log replication and §5.4.2 the commit rule --------------------------------------


def test_a_new_leader_appends_a_no_op_entry_of_its_term():
    """§8: "Raft handles this by having each leader commit a blank no-op entry into the log
    at the start of its term." """
    net = Net(logs={n: [e(1, 1), e(2, 1)] for n in ("a", "b", "c")}, term=1)
    leader = net.elect("a")
    noop = leader.log.entry(3)
    assert (noop.index, noop.term, noop.kind, noop.data) == (3, 2, EntryKind.NOOP, b"")
    assert leader.log.last_index == 3 and leader.commit == 3
    assert all(net.cores[n].log.entry(3) == noop for n in ("b", "c"))


FIG8 = RaftConfig(
    election_ticks=ELECTION,
    heartbeat_ticks=HEARTBEAT,
    check_quorum=False,  # so S5 can be elected at once after S1 crashes, as in the figure
    max_entries_per_message=1,  # so followers can acknowledge index 2 alone
)


def fig8_cluster() -> Net:
    """Figure 8 (c): S1 leads term 4 and replicates the term-2 entry at index 2; S5 holds a
    term-3 entry at index 2 and cannot hear S1."""
    ids = ("s1", "s2", "s3", "s4", "s5")
    logs = {"s1": [e(1, 1), e(2, 2)], "s5": [e(1, 1), e(2, 3)]}
    logs |= {n: [e(1, 1)] for n in ("s2", "s3", "s4")}
    net = Net(ids, logs=logs, term=3, config=FIG8)
    net.cut |= {("s1", "s5"), ("s5", "s1")}
    net.campaign("s1")

    def noop_lost(m: Message) -> bool:  # every AppendEntries carrying S1's no-op is lost
        return isinstance(m, AppendRequest) and any(x.index == 3 for x in m.entries)

    net.deliver(drop=noop_lost)
    net.tick_all(HEARTBEAT, drop=noop_lost)  # heartbeats find where followers' logs end
    return net


def test_figure8_a_leader_does_not_commit_an_earlier_term_entry_by_counting_replicas():
    """§5.4.2: "Raft never commits log entries from previous terms by counting replicas."
    Figure 8 shows why: an entry of an earlier term stored on a majority can still be
    overwritten by a future leader."""
    net = fig8_cluster()
    s1 = net.cores["s1"]
    assert s1.role == Role.LEADER and s1.term == 4
    holders = [n for n in net.ids if net.cores[n].log.term_at(2) == 2]
    assert holders == ["s1", "s2", "s3", "s4"]  # a majority holds entry (2, term 2) ...
    assert s1.commit == 0  # ... yet it is not committed
    # (d) S1 crashes; S5, whose last entry has the newer term 3, is elected ...
    net.crash("s1")
    net.heal()
    s5 = net.elect("s5")
    assert s5.term == 5
    # ... and overwrites index 2 everywhere: counting replicas would have lost a commit.
    assert [net.cores[n].log.term_at(2) for n in ("s2", "s3", "s4", "s5")] == [3, 3, 3, 3]


def test_figure8_earlier_term_entries_commit_indirectly_with_a_current_term_entry():
    """§5.4.2: "only log entries from the leader's current term are committed by counting
    replicas; once an entry from the current term has been committed in this way, then all
    prior entries are committed indirectly because of the Log Matching Property." """
    net = fig8_cluster()
    s1 = net.cores["s1"]
    net.tick_all(HEARTBEAT)  # (e) the no-op of term 4 now reaches a majority
    assert s1.commit == 3
    assert [x.index for x in net.disks["s1"].applied] == [1, 2, 3]
    assert net.cores["s5"].log.term_at(2) == 3  # S5 never heard; it can no longer win
    net.heal()
    net.tick_all(ELECTION)
    assert net.cores["s5"].log.term_at(2) == 2 and s1.role == Role.LEADER


def test_conflicting_follower_entries_are_overwritten_by_the_leaders():
    """§5.3: "the leader handles inconsistencies by forcing the followers' logs to duplicate
    its own. This means that conflicting entries in follower logs will be overwritten with
    entries from the leader's log." """
    logs = {
        "a": [e(1, 1), e(2, 3, b"x"), e(3, 3, b"y")],
        "b": [e(1, 1), e(2, 2, b"p"), e(3, 2, b"q"), e(4, 2, b"r")],  # divergent suffix
        "c": [e(1, 1)],
    }
    net = Net(logs=logs, term=3)
    leader = net.elect("a")
    b = net.cores["b"]
    assert b.log.slice(1, 10) == leader.log.slice(1, 10)
    assert [x.term for x in b.log.slice(1, 10)] == [1, 3, 3, 4]
    # The durable log was repaired by one write starting at the first conflicting index.
    writes = [rd.entries[0].index for rd in net.readies["b"] if rd.entries]
    assert writes and writes[0] == 2
    assert net.disks["b"].entries == b.log.slice(1, 10)
    assert b.commit == 4


def test_a_follower_commits_no_further_than_the_entries_it_matched():
    """Figure 2, AppendEntries receiver: "If leaderCommit > commitIndex, set commitIndex =
    min(leaderCommit, index of last new entry)"; a heartbeat confirms only up to prevLog."""
    net = Net(logs={"b": [e(1, 1), e(2, 1), e(3, 1)]}, term=1)
    b = net.cores["b"]
    b.step(AppendRequest(2, "a", "b", prev_index=1, prev_term=1, entries=(), commit=3))
    assert b.commit == 1


def test_a_leader_that_steps_down_with_a_broadcast_pending_sends_no_append_entries():
    """Election Safety (§5.2): "at most one leader can be elected in a given term". A leader
    that proposed (owing a broadcast) and then learned of a newer term in the same turn must
    not send AppendEntries stamped with that newer term, or followers would take it for that
    term's leader. (Found by the simulation, seed 2478 on 3 nodes.)"""
    net = Net()
    leader = net.elect("a")
    term = leader.term
    leader.propose(b"x")
    leader.step(AppendResponse(term + 1, "b", "a", success=False, match_index=0))
    assert leader.role == Role.FOLLOWER and leader.term == term + 1
    rd = net.handle("a")
    assert not [m for m in rd.messages if isinstance(m, AppendRequest)]


# --- §7 log compaction -----------------------------------------------------------------


def test_snapshot_compacts_the_log_and_install_snapshot_catches_up_a_lagging_follower():
    """§7: "the leader must occasionally send snapshots to followers that lag behind. This
    happens when the leader has already discarded the next log entry that it needs to send
    to a follower." """
    net = Net()
    leader = net.elect("a")
    net.isolate("c")
    for i in range(5):
        leader.propose(b"cmd%d" % i)
    net.deliver()
    assert leader.applied == leader.commit == 6
    meta = leader.snapshot_meta(leader.applied)
    assert (meta.index, meta.term, meta.voters) == (6, leader.term, ("a", "b", "c"))
    snapshot = Snapshot(meta, b"state machine at 6")
    net.disks["a"].save_snapshot(snapshot)  # the runner persists it before compacting
    leader.compact(snapshot)
    assert leader.log.snapshot_index == 6 and leader.log.first_index == 7
    with pytest.raises(ValueError):
        leader.log.slice(2, 3)
    leader.propose(b"after the snapshot")

    net.heal()
    net.tick_all(HEARTBEAT)
    c = net.cores["c"]
    sent = [m.snapshot for m in net.sent if isinstance(m, SnapshotRequest) and m.dst == "c"]
    assert sent == [snapshot]
    installs = [rd for rd in net.readies["c"] if rd.snapshot is not None]
    assert [rd.snapshot for rd in installs] == [snapshot]
    assert c.log.snapshot_index == 6 and net.disks["c"].snapshot == snapshot
    assert c.log.last_index == leader.log.last_index == 7
    assert c.log.entry(7).data == b"after the snapshot"
    assert c.commit == c.applied == 7
    assert [x.index for x in net.disks["c"].applied] == [1, 7]  # 2..6 came in the snapshot


def test_a_restarted_server_recovers_from_its_snapshot_and_log():
    net = Net()
    leader = net.elect("a")
    for i in range(3):
        leader.propose(b"cmd%d" % i)
    net.deliver()
    b = net.cores["b"]
    snapshot = Snapshot(b.snapshot_meta(b.applied), b"state")
    net.disks["b"].save_snapshot(snapshot)
    b.compact(snapshot)
    b = net.restart("b")
    assert b.log.snapshot_index == snapshot.meta.index and b.applied == snapshot.meta.index
    assert b.voters == ("a", "b", "c")
    leader.propose(b"more")
    net.tick_all(HEARTBEAT)
    assert b.log.last_index == leader.log.last_index and b.commit == leader.commit


# --- §6.4 linearizable reads (ReadIndex) --------------------------------------------------


def test_read_index_is_served_only_after_a_heartbeat_round_confirms_leadership():
    """Thesis §6.4: the leader records its current commit index as the read index, then
    issues a new round of heartbeats and waits for acknowledgments from a majority of the
    cluster before serving the read at that index."""
    net = Net()
    leader = net.elect("a")
    highest_commit = max(core.commit for core in net.cores.values())
    leader.read_index(7)
    rd = net.handle("a")
    assert rd.read_states == []
    heartbeats = [m for m in rd.messages if isinstance(m, AppendRequest)]
    assert sorted(m.dst for m in heartbeats) == ["b", "c"]
    assert all(m.read_ctx > 0 for m in heartbeats)
    leader.propose(b"a write accepted after the read arrived")
    # Only b answers; with the leader that is a majority of three.
    net.deliver(drop=lambda m: "c" in (m.src, m.dst))
    assert net.read_states["a"] == [ReadState(7, highest_commit)]
    assert leader.commit > highest_commit  # the later write is not part of this read


def test_read_index_waits_for_the_leaders_first_commit():
    """Thesis §6.4: "If the leader has not yet marked an entry from its current term
    committed, it waits until it has done so." """
    net = Net(logs={n: [e(1, 1)] for n in ("a", "b", "c")}, term=1)
    net.campaign("a")
    net.deliver(drop=lambda m: isinstance(m, AppendRequest))  # the no-op is not acked yet
    leader = net.cores["a"]
    assert leader.role == Role.LEADER and leader.commit == 0
    leader.read_index(1)
    net.flush()
    assert net.read_states["a"] == []
    net.tick_all(HEARTBEAT)
    assert net.read_states["a"] == [ReadState(1, 2)]  # at or after the no-op at index 2


def test_a_partitioned_leader_never_serves_a_read():
    """§8: "a leader must check whether it has been deposed before processing a read-only
    request": cut off from the majority, it answers no read, before or after the others
    elect a new leader and commit more."""
    net = Net()
    old = net.elect("a")
    net.isolate("a")
    asked = 0
    for _ in range(3 * ELECTION):
        if role(old) == Role.LEADER:
            asked += 1
            old.read_index(asked)
        net.tick_all()
    new = [net.cores[n] for n in ("b", "c") if net.cores[n].role == Role.LEADER]
    assert len(new) == 1 and new[0].term > old.term
    new[0].propose(b"a write the old leader never saw")
    net.deliver()
    assert asked >= ELECTION and net.read_states["a"] == []
    assert role(old) != Role.LEADER


def test_a_leader_outside_the_configuration_needs_a_majority_of_it_to_confirm_a_read():
    """Thesis §4.2.2: while a leader removes itself it "does not count itself in
    majorities": a heartbeat answered by one of three remaining voters confirms nothing."""
    net = Net(ids=("a", "b", "c", "d"))
    leader = net.elect("a")
    leader.propose_config(("b", "c", "d"))
    assert leader.role == Role.LEADER and "a" not in leader.voters
    leader.read_index(5)
    net.deliver(drop=lambda m: bool({m.src, m.dst} & {"c", "d"}))
    assert net.read_states["a"] == []
    net.tick_all(HEARTBEAT)  # now c and d answer as well
    assert [rs.ctx for rs in net.read_states["a"]] == [5]


def test_a_leader_leaving_a_two_server_cluster_does_not_answer_reads_alone():
    net = Net(ids=("a", "b"))
    leader = net.elect("a")
    leader.propose_config(("b",))
    leader.read_index(1)
    net.flush()
    assert net.read_states["a"] == []
    net.deliver()
    assert [rs.ctx for rs in net.read_states["a"]] == [1]


# --- thesis §3.10 leadership transfer ------------------------------------------------------


def test_leadership_transfer_to_an_up_to_date_follower_with_timeout_now():
    """Thesis §3.10: once the target's log is up to date, the prior leader sends it a
    TimeoutNow request, which has the same effect as the target's election timer firing;
    its election is not refused as a disruption (§4.2.3)."""
    net = Net()
    leader = net.elect("a")
    term = leader.term
    leader.transfer_leadership("b")
    rd = net.handle("a")
    assert TimeoutNow(term, "a", "b") in rd.messages
    with pytest.raises(TransferInProgress):  # "the prior leader stops accepting new requests"
        leader.propose(b"x")
    net.deliver()
    b = net.cores["b"]
    assert b.role == Role.LEADER and b.term == term + 1
    assert leader.role == Role.FOLLOWER and leader.leader == "b"
    assert any(isinstance(m, VoteRequest) and m.transfer for m in net.sent_to("c", VoteRequest))


def test_leadership_transfer_first_brings_a_lagging_target_up_to_date():
    """Thesis §3.10: the prior leader first brings the target's log up to date with its
    own, and only then sends TimeoutNow."""
    net = Net()
    leader = net.elect("a")
    net.isolate("c")
    for i in range(3):
        leader.propose(b"cmd%d" % i)
    net.deliver()
    net.heal()
    leader.transfer_leadership("c")
    rd = net.handle("a")
    assert not [m for m in rd.messages if isinstance(m, TimeoutNow)]
    assert [m.dst for m in rd.messages if isinstance(m, AppendRequest)] == ["c"]
    net.deliver()
    c = net.cores["c"]
    assert c.role == Role.LEADER
    assert c.log.term_at(5) == leader.log.term_at(5) and c.commit >= 5


def test_a_leadership_transfer_that_does_not_finish_in_an_election_timeout_is_aborted():
    """Thesis §3.10: if the transfer does not complete within about an election timeout,
    the prior leader aborts it and resumes accepting client requests."""
    net = Net()
    leader = net.elect("a")
    net.isolate("b")
    leader.transfer_leadership("b")
    net.tick_all(ELECTION - 1)
    with pytest.raises(TransferInProgress):
        leader.propose(b"x")
    net.tick_all(1)
    assert leader.role == Role.LEADER
    leader.propose(b"x")


# --- thesis §4 membership changes ----------------------------------------------------------


def test_adding_a_server_its_configuration_takes_effect_when_appended():
    """Thesis §4.1: "a server always uses the latest configuration in its log, regardless
    of whether the entry is committed." Adding d makes the majority 3 of 4 at once."""
    net = Net(ids=("a", "b", "c", "d"), voters=("a", "b", "c"))
    leader = net.elect("a")
    assert not net.sent_to("d", AppendRequest)  # d is not a member yet
    index, _ = leader.propose_config(("a", "b", "c", "d"))
    assert leader.voters == ("a", "b", "c", "d")
    net.deliver(drop=lambda m: bool({m.src, m.dst} & {"c", "d"}))
    assert leader.commit < index  # a and b alone are no majority of four
    net.tick_all(HEARTBEAT)
    d = net.cores["d"]
    assert leader.commit >= index and d.commit >= index
    assert d.voters == ("a", "b", "c", "d") and d.log.last_index == leader.log.last_index


def test_membership_changes_add_or_remove_one_server_at_a_time():
    """Thesis §4.1: one server is added or removed at a time, and a new change does not
    begin until the previous one has committed; and (the fix Ongaro posted to raft-dev in
    2015 for single-server changes) not before the leader committed an entry of its term."""
    net = Net(ids=("a", "b", "c", "d", "e"), voters=("a", "b", "c"))
    net.campaign("a")
    net.deliver(drop=lambda m: isinstance(m, AppendRequest))
    leader = net.cores["a"]
    with pytest.raises(ConfigChangeRejected):  # no entry of this term committed yet
        leader.propose_config(("a", "b", "c", "d"))
    net.tick_all(HEARTBEAT)
    with pytest.raises(ConfigChangeRejected):
        leader.propose_config(("a", "b", "c", "d", "e"))  # two at once
    with pytest.raises(ConfigChangeRejected):
        leader.propose_config(("a", "b", "d"))  # one out, one in
    net.isolate("b")
    net.isolate("c")
    leader.propose_config(("a", "b", "c", "d"))
    net.deliver()
    with pytest.raises(ConfigChangeRejected):  # the previous change is not committed
        leader.propose_config(("a", "b", "c", "d", "e"))
    with pytest.raises(NotLeader):
        net.cores["b"].propose_config(("a", "b"))


def test_a_leader_that_removes_itself_steps_down_once_the_change_commits():
    """Thesis §4.2.2: a leader removed from the configuration manages the cluster until
    C_new is committed, then steps down; the remaining servers elect a leader among
    themselves."""
    net = Net()
    leader = net.elect("a")
    index, _ = leader.propose_config(("b", "c"))
    assert role(leader) == Role.LEADER  # it still manages the cluster until C_new commits
    net.deliver()
    assert leader.commit >= index and role(leader) == Role.FOLLOWER
    stepped_down = len(net.sent)
    net.tick_all(3 * ELECTION)
    new = [n for n in ("b", "c") if net.cores[n].role == Role.LEADER]
    assert len(new) == 1 and net.cores[new[0]].voters == ("b", "c")
    assert not [m for m in net.sent[stepped_down:] if isinstance(m, VoteRequest) and m.src == "a"]


# --- the Ready contract (Figure 2: "updated on stable storage before responding") ------------


def test_a_candidate_persists_its_term_and_self_vote_with_its_vote_requests():
    net = Net()
    net.campaign("a")
    prevote = net.handle("a")
    assert prevote.hard_state is None and not prevote.must_sync  # PreVote changes nothing
    assert all(isinstance(m, VoteRequest) and m.prevote for m in prevote.messages)
    net.deliver()
    asks = [
        rd
        for rd in net.readies["a"]
        if any(isinstance(m, VoteRequest) and not m.prevote for m in rd.messages)
    ]
    assert len(asks) == 1
    assert asks[0].hard_state == HardState(1, "a") and asks[0].must_sync


def test_a_voter_persists_its_vote_in_the_ready_that_sends_it():
    net = Net()
    net.elect("a")
    for node in ("b", "c"):
        grants = [
            rd
            for rd in net.readies[node]
            if any(isinstance(m, VoteResponse) and m.granted and not m.prevote for m in rd.messages)
        ]
        assert len(grants) == 1
        assert grants[0].hard_state == HardState(1, "a") and grants[0].must_sync


def test_a_follower_persists_entries_in_the_ready_that_acknowledges_them():
    net = Net()
    leader = net.elect("a")
    leader.propose(b"x")
    net.deliver()
    acks = [
        rd
        for rd in net.readies["b"]
        if any(
            isinstance(m, AppendResponse) and m.success and m.match_index == 2 for m in rd.messages
        )
    ]
    assert acks and acks[0].entries and acks[0].entries[-1].index == 2 and acks[0].must_sync


def test_a_server_that_learns_a_newer_term_persists_it_before_answering():
    net = Net()
    c = net.cores["c"]
    c.step(AppendRequest(5, "a", "c", prev_index=3, prev_term=2, entries=(), commit=0))
    rd = net.handle("c")
    assert rd.hard_state == HardState(5, None)
    assert [m.term for m in rd.messages] == [5]


def test_advance_leaves_nothing_to_do_and_no_hard_state_is_repeated():
    net = Net()
    net.elect("a")
    net.tick_all(ELECTION)
    for node in net.ids:
        states = [rd.hard_state for rd in net.readies[node] if rd.hard_state is not None]
        assert len(states) == len(set(states))
        assert not net.cores[node].has_ready()


def test_a_crash_before_persisting_loses_nothing_that_was_promised():
    """Figure 2: persistent state is "updated on stable storage before responding to
    RPCs". A voter that crashes before persisting its Ready sent nothing, so after a
    restart it may still vote, and only once."""
    net = Net()
    c = net.cores["c"]
    c.step(VoteRequest(1, "a", "c", 0, 0))
    c.ready()  # the Ready is taken, then the process dies before persisting it
    c = net.restart("c")
    assert (c.term, c.vote) == (0, None)
    c.step(VoteRequest(1, "b", "c", 0, 0))
    rd = net.handle("c")
    assert [m.dst for m in rd.messages if isinstance(m, VoteResponse) and m.granted] == ["b"]


def test_followers_name_the_leader_when_refusing_a_proposal():
    net = Net()
    net.elect("a")
    with pytest.raises(NotLeader) as info:
        net.cores["b"].propose(b"x")
    assert info.value.leader == "a"


def test_a_leader_counts_itself_only_for_entries_it_has_persisted():
    """Thesis 10.2.1: "the leader can write to its disk in parallel with replicating to
    the followers ... the leader may commit an entry before it has written it to its own
    disk" only if a majority of *other* servers have; so it must count its own copy only
    once that write is done. The runner sends a leader's AppendEntries (Ready.
    early_messages) before persisting the Ready; an acknowledgement that arrives first
    must not commit the entry on the strength of the leader's unwritten copy."""
    net = Net()
    leader = net.elect("a")
    index, _ = leader.propose(b"x")
    rd = leader.ready()
    early, later = rd.early_messages(leading=True)
    assert early and all(isinstance(m, AppendRequest) for m in early)
    assert not any(isinstance(m, AppendRequest) for m in later)
    assert [m.entries[-1].index for m in early if m.dst == "b"] == [index]
    # b persists and acknowledges while a's own write is still running.
    net.cores["b"].step(next(m for m in early if m.dst == "b"))
    net.handle("b")
    ack = next(m for m in net.queue if isinstance(m, AppendResponse) and m.dst == "a")
    leader.step(ack)
    assert leader.commit < index  # one durable copy (b's) is not a majority of three
    # a's write completes: now two durable copies, a majority.
    net.disks["a"].write(rd)
    leader.advance(rd)
    assert leader.commit == index
    assert leader.has_ready()  # the commit is applied in the next Ready


def test_only_a_leaders_appends_may_leave_before_its_persist():
    """Votes and a follower's acknowledgements speak for what is on disk: they wait."""
    net = Net(config=RaftConfig(election_ticks=ELECTION, heartbeat_ticks=HEARTBEAT,
                                prevote=False))
    candidate = net.campaign("a")
    rd = candidate.ready()
    assert rd.hard_state is not None and rd.messages  # the vote for itself, to persist
    assert candidate.role == Role.CANDIDATE
    assert rd.early_messages(leading=False) == ([], rd.messages)
    net.disks["a"].write(rd)
    candidate.advance(rd)
    net.queue.extend(rd.messages)
    net.deliver()
    # A follower's Ready holding entries and its acknowledgement: nothing goes early.
    leader = net.cores["a"]
    assert leader.role == Role.LEADER
    leader.propose(b"y")
    net.flush()
    append = next(m for m in net.queue if isinstance(m, AppendRequest) and m.dst == "b")
    net.queue.clear()
    follower = net.cores["b"]
    follower.step(append)
    frd = follower.ready()
    assert frd.entries and any(isinstance(m, AppendResponse) for m in frd.messages)
    assert frd.early_messages(leading=follower.role == Role.LEADER) == ([], frd.messages)


# --- a node that lost its disk (not in the paper: the thesis §10.3 notes that Raft
# assumes stable storage survives; service/node.py brings such a node back this way) ---


def test_a_node_back_with_an_empty_disk_cannot_vote_again_in_a_term_it_voted_in():
    net = Net()
    c = net.cores["c"]
    c.step(VoteRequest(1, "a", "c", 0, 0))
    net.handle("c")
    c = net.lose_disk("c", peer_term=1)  # the vote for a is gone with the disk
    c.step(VoteRequest(1, "b", "c", 0, 0))
    rd = net.handle("c")
    assert [m.granted for m in rd.messages if isinstance(m, VoteResponse)] == [False]


def test_a_rejoining_node_neither_votes_nor_campaigns_until_caught_up():
    net = Net()
    leader = net.elect("a")
    for i in range(3):
        leader.propose(b"cmd%d" % i)
    net.deliver()
    c = net.lose_disk("c", peer_term=leader.term)
    for _ in range(3 * ELECTION):
        c.tick()
    rd = net.handle("c")
    assert not any(isinstance(m, VoteRequest) for m in rd.messages), "it campaigned"
    c.step(VoteRequest(leader.term + 1, "b", "c", leader.log.last_index, leader.term))
    rd = net.handle("c")
    assert [m.granted for m in rd.messages if isinstance(m, VoteResponse)] == [False]
    assert c.rejoining
    net.deliver()  # b's request deposed a; a leader is elected again without c's vote
    for _ in range(6 * ELECTION):
        net.tick_all()
        if not c.rejoining:
            break
    leaders = [core for core in net.cores.values() if core.role == Role.LEADER]
    assert not c.rejoining and len(leaders) == 1
    assert c.log.last_index == leaders[0].log.last_index


def test_a_rejoining_node_cannot_help_elect_a_leader_without_what_it_lost():
    """a and c committed X; b never got it. c loses its disk and a crashes: b must not
    become leader with c's vote, or X, acknowledged, would be overwritten."""
    net = Net()
    leader = net.elect("a")
    net.cut |= {("a", "b")}
    index, _ = leader.propose(b"X")
    net.deliver()
    assert leader.commit >= index and net.cores["b"].log.last_index < index
    net.crash("a")
    net.heal()
    net.lose_disk("c", peer_term=leader.term)
    for _ in range(3):
        b = net.campaign("b")
        net.deliver()
        assert role(b) != Role.LEADER


def test_a_leader_starts_over_with_a_follower_that_lost_its_log():
    """The leader's match index for c says c holds everything; c's rejection says its log
    is gone (log_lost), and the leader sends it all again instead of probing forever."""
    net = Net()
    leader = net.elect("a")
    for i in range(4):
        leader.propose(b"cmd%d" % i)
    net.deliver()
    c = net.lose_disk("c", peer_term=leader.term)
    net.tick_all(3 * HEARTBEAT)
    assert not c.rejoining and c.log.last_index == leader.log.last_index
    assert c.commit == leader.commit
