"""Seeded simulation of 3- and 5-node clusters running the real Raft core.

Each run (tests/sim/cluster.py `run_seed`) is chaos for CHAOS_TICKS ticks (message loss,
delay and reordering, duplication, symmetric and one-way partitions, crashes that lose
unsynced data, crashes inside Ready handling, restarts, snapshots, membership changes and
leadership transfers) with Raft's safety properties checked after every turn, then a heal
after which a leader must be elected and a fresh proposal committed within LIVENESS_TICKS.

Which seeds run:
- default (CI): DEFAULT_SEEDS seeds on each cluster size, in chunks so a failure names its
  seeds, plus every PINNED_SEEDS entry;
- DSYNC_SIM_SEEDS=N (`make sim SEEDS=N`): seeds 0..N-1 on each size instead;
- DSYNC_SIM_SEED=s: seed s only, on each size (what a failure message tells you to run);
- DSYNC_SIM_TICKS=t: chaos for t ticks instead of CHAOS_TICKS (longer runs hunt deeper).
A failing seed's message carries the seed, the cluster size, the last events and the rerun
command.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest

from service.raft.core import RaftConfig, RaftCore, Role
from service.raft.log import RaftLog
from service.raft.messages import (
    Entry,
    EntryKind,
    HardState,
    Message,
    ReadState,
    Snapshot,
    SnapshotMeta,
    TimeoutNow,
    VoteRequest,
)
from tests.sim.checker import Checker, SafetyViolation
from tests.sim.cluster import (
    DISK_LOSS,
    TICK,
    Cluster,
    SimNode,
    SimulationFailure,
    run_seed,
)
from tests.sim.disk import GENESIS, StateMachine

SIZES = (3, 5)
DEFAULT_SEEDS = 150  # per cluster size: 300 runs in CI
CHUNK = 25
CHAOS_TICKS = int(os.environ.get("DSYNC_SIM_TICKS", 1000))
LIVENESS_TICKS = 200
# On a healed cluster whose leader just committed, the next proposal commits at once: no
# further election may be needed.
STABLE_COMMIT_TICKS = 10

# Configurations other than the simulator's default, for pinned runs that need them.
NO_PREVOTE = RaftConfig(election_ticks=10, heartbeat_ticks=2, prevote=False)
NO_PREVOTE_NO_CHECK_QUORUM = RaftConfig(
    election_ticks=10, heartbeat_ticks=2, prevote=False, check_quorum=False
)

# (seed, size, chaos_ticks, config or None for the default) of every run that once failed,
# with the bug it found. Each runs in CI with the settings that exposed it (rerun one alone
# with DSYNC_SIM_SEED=seed DSYNC_SIM_TICKS=chaos_ticks, or by its test id).
PINNED_SEEDS: list[tuple[int, int, int, RaftConfig | None]] = [
    # A leader that stepped down in the same turn as a proposal still broadcast
    # AppendEntries in its next Ready, stamped with the newer term it had just learned
    # (followers would take it for that term's leader); here it crashed on the progress of
    # a voter it had removed. Fixed: stepping down cancels the pending broadcast (core.py
    # `_reset`).
    (2478, 3, 2000, None),
    # Without PreVote, a server ignored RequestVote with a stale term instead of refusing it
    # with its own term (§5.1), so a candidate that only servers with newer terms could
    # hear never learned their term and campaigned forever: no leader after healing.
    # Fixed: `_step_stale` refuses every stale vote request.
    (14, 3, 1000, NO_PREVOTE),
    (22, 3, 1000, NO_PREVOTE_NO_CHECK_QUORUM),
]


def _selected_seeds() -> list[int]:
    one = os.environ.get("DSYNC_SIM_SEED")
    if one:
        return [int(one)]
    count = int(os.environ.get("DSYNC_SIM_SEEDS", DEFAULT_SEEDS))
    return list(range(count))


def _chunks() -> list[tuple[int, list[int]]]:
    seeds = _selected_seeds()
    return [(size, seeds[i : i + CHUNK]) for size in SIZES for i in range(0, len(seeds), CHUNK)]


def _chunk_id(chunk: tuple[int, list[int]]) -> str:
    size, seeds = chunk
    span = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    return f"{size}nodes-seeds{span}"


def simulate(
    seed: int, size: int, chaos_ticks: int = CHAOS_TICKS, config: RaftConfig | None = None
) -> Cluster:
    """One run: chaos, heal, liveness; then the healed cluster must stay live."""
    cluster = run_seed(
        seed, size, chaos_ticks=chaos_ticks, liveness_ticks=LIVENESS_TICKS, config=config
    )
    try:
        # run_seed's liveness check passed: a leader was elected and committed a proposal.
        assert cluster.checker.elections > 0 and cluster.checker.max_commit > 0
        # A leader still in place commits the next proposal at once; none is left only when
        # the entry that just committed removed the leader itself, which then stepped down.
        # Without PreVote that promise does not hold: a node that campaigned alone during a
        # partition rejoins with a higher term and deposes the leader (thesis 9.6, the
        # reason PreVote exists), so such runs get a full election's bound.
        stable = cluster.leaders() and (config is None or config.prevote)
        bound = STABLE_COMMIT_TICKS if stable else LIVENESS_TICKS
        ticks = cluster.check_liveness(bound)
        assert 1 <= ticks <= bound
    except Exception as exc:
        raise SimulationFailure(seed, size, exc, cluster.format_trace()) from exc
    return cluster


def _run_all(runs: list[tuple[int, int, int, RaftConfig | None]]) -> None:
    failures: list[tuple[int, int, SimulationFailure]] = []
    for seed, size, chaos_ticks, config in runs:
        try:
            simulate(seed, size, chaos_ticks, config)
        except SimulationFailure as failure:
            failures.append((seed, size, failure))
    if failures:
        names = ", ".join(f"seed {seed} ({size} nodes)" for seed, size, _ in failures)
        details = "\n\n".join(str(failure) for _, _, failure in failures)
        pytest.fail(f"{len(failures)} simulation(s) failed: {names}\n\n{details}", pytrace=False)


@pytest.mark.parametrize("chunk", _chunks(), ids=_chunk_id)
def test_seeded_simulation(chunk: tuple[int, list[int]]) -> None:
    size, seeds = chunk
    _run_all([(seed, size, CHAOS_TICKS, None) for seed in seeds])


def _pinned_id(pinned: tuple[int, int, int, RaftConfig | None]) -> str:
    seed, size, ticks, config = pinned
    flags = "" if config is None else f"-prevote{config.prevote:d}-cq{config.check_quorum:d}"
    return f"{size}nodes-seed{seed}-ticks{ticks}{flags}"


DISK_LOSS_SEEDS = 60  # per cluster size


@pytest.mark.parametrize("size", SIZES)
def test_seeded_simulation_with_lost_disks(size: int) -> None:
    """CHAOS, and some restarts come back with an empty disk (rejoining, service/raft/
    rejoin.py): every safety property still holds, and the cluster is live after."""
    failures: list[SimulationFailure] = []
    losses = 0
    for seed in range(DISK_LOSS_SEEDS):
        try:
            cluster = run_seed(
                seed, size, chaos_ticks=CHAOS_TICKS, liveness_ticks=LIVENESS_TICKS,
                faults=DISK_LOSS,
            )  # fmt: skip
        except SimulationFailure as failure:
            failures.append(failure)
            continue
        losses += cluster.stats["disk_losses"]
    if failures:
        details = "\n\n".join(str(f) for f in failures[:3])
        pytest.fail(f"{len(failures)} run(s) with lost disks failed:\n\n{details}", pytrace=False)
    assert losses >= DISK_LOSS_SEEDS, f"only {losses} disks were lost: the fault did not run"


@pytest.mark.parametrize("pinned", PINNED_SEEDS, ids=_pinned_id)
def test_pinned_seed(pinned: tuple[int, int, int, RaftConfig | None]) -> None:
    _run_all([pinned])


# --- every fault kind is exercised ------------------------------------------------------


class RecordingCluster(Cluster):
    """A Cluster that counts which faults and protocol paths a run went through."""

    def __init__(self, seed: int, size: int) -> None:
        self.seen: Counter[str] = Counter()
        self._max_seq: dict[tuple[str, str], int] = {}
        super().__init__(seed, size)

    def crash(self, node: SimNode, why: str) -> None:
        core = node.core
        if core is not None and (
            core.log.unstable_from <= core.log.last_index or why.startswith("before persist")
        ):
            self.seen["crash losing unsynced data"] += 1
        kind = "crash: process killed" if why == "process killed" else f"crash in Ready: {why}"
        self.seen[kind.split(" (")[0].split(",")[0]] += 1
        super().crash(node, why)

    def _start(self, node: SimNode) -> None:
        if node.restart_at is not None:
            self.seen["restart"] += 1
        super()._start(node)

    def _change_partition(self) -> None:
        super()._change_partition()
        detail = str(self.trace[-1][3])
        self.seen[f"partition: {detail.split(':')[0]}"] += 1

    def _send(self, m: Message) -> None:
        before = len(self.net)
        dropped = self.stats["dropped"]
        super()._send(m)
        if len(self.net) - before == 2:
            self.seen["duplicate"] += 1
        if self.stats["dropped"] > dropped:
            self.seen["drop"] += 1

    def _deliver_due(self) -> None:
        due = sorted(x for x in self.net if x[0] <= self.now)
        for _, seq, m in due:
            link = (m.src, m.dst)
            if seq < self._max_seq.get(link, -1):
                self.seen["reorder"] += 1
            self._max_seq[link] = max(seq, self._max_seq.get(link, -1))
            if isinstance(m, TimeoutNow):
                self.seen["leader transfer (TimeoutNow)"] += 1
            if isinstance(m, VoteRequest) and m.transfer:
                self.seen["transfer election"] += 1
        super()._deliver_due()


def test_every_fault_kind_is_exercised_by_the_default_settings() -> None:
    seen: Counter[str] = Counter()
    checker_totals: Counter[str] = Counter()
    for size in SIZES:
        for seed in range(10):
            cluster = RecordingCluster(seed, size)
            cluster.run(CHAOS_TICKS * TICK)
            seen.update(cluster.seen)
            seen.update({f"stat: {k}": v for k, v in cluster.stats.items()})
            applied = cluster.checker.applied.values()
            checker_totals["membership changes applied"] += sum(
                1 for _, kind, _ in applied if kind == EntryKind.CONFIG
            )
            checker_totals["snapshots installed (InstallSnapshot)"] += (
                cluster.checker.snapshots_installed
            )
            checker_totals["reads answered"] += cluster.checker.reads_answered
            checker_totals["elections"] += cluster.checker.elections
    expected = [
        "drop",
        "duplicate",
        "reorder",
        "partition: isolate",
        "partition: split",
        "partition: mute",
        "partition: deaf",
        "partition: links",
        "partition: heal",
        "crash: process killed",
        "crash losing unsynced data",
        "crash in Ready: before persisting a Ready",
        "crash in Ready: after persisting a Ready",
        "crash in Ready: after sending a Ready's messages",
        "crash in Ready: after applying a Ready",
        "restart",
        "leader transfer (TimeoutNow)",
        "transfer election",
        "stat: compactions",
        "stat: config_changes",
    ]
    missing = [k for k in expected if seen[k] == 0]
    missing += [k for k, v in checker_totals.items() if v == 0]
    assert not missing, f"fault kinds never exercised: {missing}\nseen: {dict(seen)}"


# --- the checker catches violations -------------------------------------------------------


def _core(node: str, *, term: int = 1, role: Role = Role.FOLLOWER, entries=(), commit=0):
    """A core with a fabricated state (the checker only reads it)."""
    core = RaftCore(node, ("n1", "n2", "n3"), random.Random(0))
    core.log = RaftLog(0, 0, entries)
    core.term = term
    core.role = role
    core.commit = commit
    core.applied = 0
    return core


def test_checker_catches_two_leaders_in_one_term() -> None:
    checker = Checker(["n1", "n2", "n3"])
    a = _core("n1", term=2, role=Role.LEADER)
    b = _core("n2", term=2, role=Role.LEADER)
    checker.after_turn("n1", a, [("n1", a)])
    with pytest.raises(SafetyViolation, match="Election Safety"):
        checker.after_turn("n2", b, [("n1", a), ("n2", b)])


def test_checker_catches_a_commit_index_going_back() -> None:
    checker = Checker(["n1", "n2", "n3"])
    log = [Entry(1, 1), Entry(2, 1)]
    checker.after_turn("n1", _core("n1", entries=log, commit=2), [])
    with pytest.raises(SafetyViolation, match="commit index went back"):
        checker.after_turn("n1", _core("n1", entries=log, commit=1), [])


def test_checker_catches_a_term_going_back_across_a_restart() -> None:
    checker = Checker(["n1", "n2", "n3"])
    checker.on_persist_hard_state("n1", HardState(5, "n1"))
    with pytest.raises(SafetyViolation, match="durable term went back"):
        checker.on_persist_hard_state("n1", HardState(4, None))
    # A restarted core whose term is not the one it persisted.
    with pytest.raises(SafetyViolation, match="never persisted"):
        checker.on_restart("n1", _core("n1", term=3), 0)
    # And an in-memory term going back between turns.
    checker.after_turn("n2", _core("n2", term=7), [])
    with pytest.raises(SafetyViolation, match="term went back"):
        checker.after_turn("n2", _core("n2", term=6), [])


def test_checker_catches_a_changed_vote_within_a_term() -> None:
    checker = Checker(["n1", "n2", "n3"])
    checker.on_persist_hard_state("n1", HardState(5, "n2"))
    with pytest.raises(SafetyViolation, match="changed its durable vote"):
        checker.on_persist_hard_state("n1", HardState(5, "n3"))


def test_checker_catches_log_matching_and_state_machine_violations() -> None:
    checker = Checker(["n1", "n2", "n3"])
    base = [Entry(1, 1, EntryKind.NORMAL, b"x")]
    checker.on_new_entries("n1", _core("n1", entries=base), base)
    other = [Entry(1, 1, EntryKind.NORMAL, b"y")]
    with pytest.raises(SafetyViolation, match="Log Matching"):
        checker.on_new_entries("n2", _core("n2", entries=other), other)

    checker.on_apply("n1", base[0], b"d1")
    with pytest.raises(SafetyViolation, match="State Machine Safety"):
        checker.on_apply("n2", Entry(1, 2, EntryKind.NORMAL, b"z"), b"d2")


def test_checker_catches_a_leader_missing_a_committed_entry() -> None:
    checker = Checker(["n1", "n2", "n3"])
    committed = [Entry(1, 1), Entry(2, 1)]
    checker.after_turn("n1", _core("n1", entries=committed, commit=2), [])
    leader = _core("n2", term=2, role=Role.LEADER, entries=[Entry(1, 1), Entry(2, 2)])
    with pytest.raises(SafetyViolation, match="Leader Completeness"):
        checker.after_turn("n2", leader, [("n2", leader)])


def test_checker_catches_a_stale_read_and_applied_index_going_back() -> None:
    checker = Checker(["n1", "n2", "n3"])
    checker.after_turn("n1", _core("n1", entries=[Entry(i, 1) for i in (1, 2, 3)], commit=3), [])
    checker.on_read_started(1, "n2")
    with pytest.raises(SafetyViolation, match="Linearizable reads"):
        checker.on_read_state("n2", _core("n2", commit=3), ReadState(1, 2))

    checker.on_apply("n3", Entry(1, 1), b"d")
    with pytest.raises(SafetyViolation, match="applied index went back"):
        checker.on_restart("n3", _core("n3", term=0), 0)


def test_checker_catches_a_snapshot_that_differs_from_the_applied_state() -> None:
    checker = Checker(["n1", "n2", "n3"])
    machine = StateMachine()
    machine.apply(Entry(1, 1))
    checker.on_apply("n1", Entry(1, 1), machine.digest)
    wrong = StateMachine(1, GENESIS).serialise()
    with pytest.raises(SafetyViolation, match="snapshot"):
        checker.on_snapshot("n2", Snapshot(SnapshotMeta(1, 1, ("n1",)), wrong))


def test_the_simulation_catches_a_core_without_the_voting_restriction(monkeypatch) -> None:
    """A mutant core that grants votes to candidates with stale logs (§5.4.1 removed) must
    fail within a few seeds, and the failure must name its seed and the rerun command."""
    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, index, term: True)
    with pytest.raises(SimulationFailure) as info:
        for seed in range(20):
            run_seed(seed, 3, chaos_ticks=CHAOS_TICKS)
    failure = info.value
    assert isinstance(failure.cause, SafetyViolation)
    assert f"DSYNC_SIM_SEED={failure.seed} pytest tests/sim" in str(failure)
    assert f"simulation seed {failure.seed} (3 nodes)" in str(failure)


def test_the_simulation_catches_a_core_that_votes_twice_in_a_term(monkeypatch) -> None:
    original = RaftCore._handle_vote_request

    def forgetful(self: RaftCore, m: VoteRequest) -> None:
        if not m.prevote and m.term == self.term:
            self.vote = None  # forgets whom it voted for in this term
            self.leader = None
        original(self, m)

    monkeypatch.setattr(RaftCore, "_handle_vote_request", forgetful)
    with pytest.raises(SimulationFailure, match=r"durable vote|Election Safety"):
        for seed in range(30):
            run_seed(seed, 5, chaos_ticks=CHAOS_TICKS)
