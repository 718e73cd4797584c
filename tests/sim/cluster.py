"""A deterministic discrete-event simulation of a Raft cluster running the real core.

Each simulated node is a `RaftCore` plus a runner that follows the core's contract exactly
(step inputs, then `ready()` -> persist -> send -> apply -> `advance()`), and a `Disk` that
holds only what was persisted. Everything random comes from one `random.Random(seed)`, time
is an integer (a tick is `TICK` units), and nothing iterates an unordered set, so a seed
replays the same run on any machine.

Faults: message loss, delay (reordering), duplication, partitions (symmetric and one-way),
crashes outside and inside Ready handling (before or after persisting, after sending, after
applying), restarts from the disk, snapshots with log compaction, membership changes and
leadership transfers. The `Checker` verifies Raft's safety properties after every turn.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Final

from service.raft.core import ABSTAIN, RaftConfig, RaftCore, RaftError, Role
from service.raft.messages import (
    AppendRequest,
    AppendResponse,
    HardState,
    Message,
    Ready,
    Snapshot,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from tests.sim.checker import Checker, SafetyViolation
from tests.sim.disk import Disk

TICK: Final = 10  # time units per tick
TRACE_LEN: Final = 60
CRASH_POINTS: Final = ("before_persist", "after_persist", "after_send", "after_apply")


class LivenessFailure(AssertionError):
    pass


class SimulationFailure(AssertionError):
    """A property failed (or the core raised); carries the seed and the recent trace."""

    def __init__(self, seed: int, size: int, cause: BaseException, trace: list[str]) -> None:
        self.seed = seed
        self.cause = cause
        lines = "\n".join(trace)
        super().__init__(
            f"simulation seed {seed} ({size} nodes) failed: {type(cause).__name__}: {cause}\n"
            f"last {len(trace)} events:\n{lines}\n"
            f"rerun: DSYNC_SIM_SEED={seed} pytest tests/sim"
        )


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault rates. `*_every` is the mean number of time units between events (0: never)."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: tuple[int, int] = (1, 4)
    long_delay: float = 0.0  # probability a message takes up to `long_delay_max` units
    long_delay_max: int = 4 * TICK
    crash_in_ready: float = 0.0  # probability a Ready with work is cut short by a crash
    down_time: tuple[int, int] = (3 * TICK, 40 * TICK)
    compact: float = 0.0  # probability per turn of taking a snapshot (when worthwhile)
    partition_every: int = 0
    crash_every: int = 0
    config_every: int = 0
    transfer_every: int = 0
    propose_every: int = 3 * TICK
    read_every: int = 8 * TICK
    # Probability that a restart finds the node's disk empty (drawn from a generator of
    # its own, so runs without disk loss keep their trajectories and pinned seeds).
    disk_loss: float = 0.0


CHAOS: Final = Faults(
    drop=0.05,
    duplicate=0.03,
    delay=(1, 6),
    long_delay=0.04,
    crash_in_ready=0.004,
    compact=0.04,
    partition_every=40 * TICK,
    crash_every=60 * TICK,
    config_every=120 * TICK,
    transfer_every=100 * TICK,
    propose_every=2 * TICK,
    read_every=6 * TICK,
)

# CHAOS, and some restarts lose the disk: the node comes back as service/node.py brings
# it back (the highest term of its peers with the ABSTAIN vote, rejoining).
DISK_LOSS: Final = replace(CHAOS, disk_loss=0.3)

CALM: Final = Faults(compact=0.04, propose_every=4 * TICK, read_every=8 * TICK)

TIMERS: Final = ("partition", "crash", "config", "transfer", "propose", "read")


@dataclass(slots=True)
class SimNode:
    id: str
    disk: Disk = field(default_factory=Disk)
    core: RaftCore | None = None
    inbox: list[Message] = field(default_factory=list)
    turn_at: int | None = None
    next_tick: int = 0
    restart_at: int | None = None
    last_role: tuple[Role, int] = (Role.FOLLOWER, 0)


class Cluster:
    def __init__(
        self,
        seed: int,
        size: int,
        *,
        config: RaftConfig | None = None,
        faults: Faults = CHAOS,
    ) -> None:
        self.seed = seed
        self.size = size
        self.rng = random.Random(seed)
        self._disk_rng = random.Random(seed * 7919 + 17)
        self.cfg = config or RaftConfig(election_ticks=10, heartbeat_ticks=2)
        self.faults = faults
        self.ids = [f"n{i}" for i in range(1, size + 1)]
        self.min_voters = 2 if size <= 3 else 3
        self.now = 0
        self.nodes = {i: SimNode(i) for i in self.ids}
        self.net: list[tuple[int, int, Message]] = []
        self._seq = 0
        self.blocked: set[tuple[str, str]] = set()  # (src, dst) links that lose everything
        self.trace: deque[tuple[int, str, str, object]] = deque(maxlen=TRACE_LEN)
        self.checker = Checker(self.ids)
        self.stats: Counter[str] = Counter()
        self.timers: dict[str, int] = {}
        self._command = 0
        self._read_ctx = 0
        for node in self.nodes.values():
            self._start(node)
        self._schedule_all_timers()

    # --- running ------------------------------------------------------------------------

    def run(self, duration: int) -> None:
        """Advance simulated time by `duration` units (bounded by the event count)."""
        end = self.now + duration
        for _ in range(duration * 50):
            if not self.step(until=end):
                return
        raise AssertionError("simulation made no progress in time (event storm)")

    def step(self, until: int) -> bool:
        """Process everything due at the next event time; False once past `until`."""
        t = self._next_event_time()
        if t > until:
            self.now = until
            return False
        self.now = t
        self._deliver_due()
        for node in self.nodes.values():
            if node.core is None and node.restart_at is not None and node.restart_at <= t:
                self._restart(node)
        for name in TIMERS:
            if self.timers.get(name, -1) == t:
                self._fire(name)
        due = [
            n
            for n in self.nodes.values()
            if n.core is not None
            and ((n.turn_at is not None and n.turn_at <= t) or n.next_tick <= t)
        ]
        self.rng.shuffle(due)
        for node in due:
            if node.core is not None:
                self._turn(node)
        return True

    def _next_event_time(self) -> int:
        times = [t for t in self.timers.values() if t > self.now - 1]
        if self.net:
            times.append(self.net[0][0])
        for n in self.nodes.values():
            if n.core is not None:
                times.append(n.next_tick)
                if n.turn_at is not None:
                    times.append(n.turn_at)
            elif n.restart_at is not None:
                times.append(n.restart_at)
        return max(self.now, min(times))

    # --- node lifecycle ---------------------------------------------------------------------

    def _restart(self, node: SimNode) -> None:
        if self.faults.disk_loss and self._disk_rng.random() < self.faults.disk_loss:
            others = [n.core for n in self.nodes.values() if n is not node]
            # As the node runtime does: only with every peer answering, and one lost disk
            # at a time (a second before the first caught up is two failures at once).
            # Not in a configuration of two voters either (it tolerates no failure), nor
            # while a membership change is on its way (the nodes disagree on the voters):
            # a voter in flight out of the configuration is one vote fewer already.
            configs = {tuple(sorted(c.voters)) for c in others if c is not None}
            if (
                all(c is not None and not c.rejoining for c in others)
                and len(configs) == 1
                and len(next(iter(configs))) >= 3
            ):
                floor = max(c.term for c in others if c is not None)
                node.disk = Disk(hard_state=HardState(floor, ABSTAIN), rejoining=True)
                self.checker.on_disk_lost(node.id, node.disk.hard_state)
                self.stats["disk_losses"] += 1
                self._trace(node.id, "DISK LOST", f"back with term {floor}, rejoining")
                self._start(node)
                return
        self._start(node)

    def _start(self, node: SimNode) -> None:
        disk = node.disk
        if disk.snapshot is not None and disk.machine.applied < disk.snapshot.meta.index:
            # Crashed between persisting a received snapshot and materialising it.
            disk.install(disk.snapshot)
        core = RaftCore(
            node.id,
            tuple(self.ids),
            random.Random(self.rng.getrandbits(64)),
            self.cfg,
            hard_state=disk.hard_state,
            snapshot=disk.snapshot,
            entries=tuple(disk.entries),
            applied=disk.machine.applied,
            rejoining=disk.rejoining,
        )
        node.core = core
        node.restart_at = None
        node.inbox = []
        node.turn_at = None
        node.next_tick = self.now + self.rng.randint(1, TICK)
        node.last_role = (core.role, core.term)
        self.checker.on_restart(node.id, core, disk.machine.applied)
        self._trace(
            node.id,
            "start",
            f"term={core.term} vote={core.vote} "
            f"log=({core.log.snapshot_index},{core.log.last_index}] applied={core.applied}",
        )

    def crash(self, node: SimNode, why: str) -> None:
        node.core = None
        node.inbox = []
        node.turn_at = None
        lo, hi = self.faults.down_time
        node.restart_at = self.now + self.rng.randint(lo, hi)
        self.stats["crashes"] += 1
        self._trace(node.id, "CRASH", why)

    def _turn(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        node.turn_at = None
        inbox, node.inbox = node.inbox, []
        for m in inbox:
            self._trace(node.id, "recv", m)
            core.step(m)
        if node.next_tick <= self.now:
            core.tick()
            # One tick per turn even when late, as the runner does; small drift per node.
            node.next_tick = max(node.next_tick + TICK + self.rng.randint(-1, 1), self.now + 1)
        self._handle_ready(node, core)
        if node.core is not core:
            return  # crashed in the middle
        role = (core.role, core.term)
        if role != node.last_role:
            node.last_role = role
            self._trace(
                node.id,
                "role",
                f"{core.role.value} term={core.term} "
                f"last={core.log.last_index} commit={core.commit}",
            )
        self.checker.after_turn(node.id, core, self._leaders())
        if node.disk.rejoining and not core.rejoining:
            node.disk.rejoining = False  # caught up: as the runtime deletes its marker

    def _handle_ready(self, node: SimNode, core: RaftCore) -> None:
        if not core.has_ready():
            if self.rng.random() < 0.05:
                rd = core.ready()
                if not rd.is_empty() or rd.hard_state is not None:
                    raise SafetyViolation(f"{node.id}: has_ready() was False but ready() had work")
                core.advance(rd)
            return
        rd = core.ready()
        self._trace(node.id, "ready", _describe_ready(rd))
        self.checker.on_new_entries(node.id, core, rd.entries)
        if rd.snapshot is not None:
            self.checker.on_snapshot(node.id, rd.snapshot)
        crash_at = None
        durable_work = rd.hard_state is not None or bool(rd.entries) or rd.snapshot is not None
        if (durable_work or rd.messages) and self.rng.random() < self.faults.crash_in_ready:
            crash_at = self.rng.choice(CRASH_POINTS)
        early, messages = rd.early_messages(core.role == Role.LEADER)
        for m in early:
            self._send(m)  # as the runner does: a leader's appends leave before its persist
        if crash_at == "before_persist":
            self.crash(node, "before persisting a Ready (its writes and later messages are lost)")
            return
        if rd.hard_state is not None:
            self.checker.on_persist_hard_state(node.id, rd.hard_state)
        node.disk.persist(rd)
        if crash_at == "after_persist":
            self.crash(node, "after persisting a Ready, before sending or applying it")
            return
        if rd.snapshot is not None:
            node.disk.install(rd.snapshot)
            self.checker.snapshots_installed += 1
        for m in messages:
            self._send(m)
        if crash_at == "after_send":
            self.crash(node, "after sending a Ready's messages, before applying")
            return
        machine = node.disk.machine
        for entry in rd.committed:
            machine.apply(entry)
            self.checker.on_apply(node.id, entry, machine.digest)
        for rs in rd.read_states:
            self.checker.on_read_state(node.id, core, rs)
        if crash_at == "after_apply":
            self.crash(node, "after applying a Ready, before advance()")
            return
        core.advance(rd)
        self._check_after_advance(node, core)
        self._maybe_compact(node, core)

    def _check_after_advance(self, node: SimNode, core: RaftCore) -> None:
        if core.has_ready():
            raise SafetyViolation(f"{node.id}: advance() left work pending")
        disk = node.disk
        if core.applied != disk.machine.applied:
            raise SafetyViolation(
                f"{node.id}: core applied {core.applied}, state machine at {disk.machine.applied}"
            )
        log = core.log
        if disk.snapshot_index != log.snapshot_index or disk.entries != log.slice(
            log.first_index, log.last_index + 1
        ):
            raise SafetyViolation(
                f"{node.id}: durable log ({disk.snapshot_index},{disk.last_index}] differs "
                f"from the core's log ({log.snapshot_index},{log.last_index}] after advance()"
            )
        if (disk.hard_state.term, disk.hard_state.vote) != (core.term, core.vote):
            raise SafetyViolation(f"{node.id}: durable hard state differs after advance()")

    def _maybe_compact(self, node: SimNode, core: RaftCore) -> None:
        if core.applied - core.log.snapshot_index < 3:
            return
        if self.rng.random() >= self.faults.compact:
            return
        meta = core.snapshot_meta(core.applied)
        snapshot = Snapshot(meta, node.disk.machine.serialise())
        self.checker.on_snapshot(node.id, snapshot)
        node.disk.save_snapshot(snapshot)
        core.compact(snapshot)
        self.stats["compactions"] += 1
        self._trace(node.id, "compact", f"snapshot at {meta.index} term {meta.term}")

    # --- network ------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        f = self.faults
        if (m.src, m.dst) in self.blocked:
            self.stats["blocked"] += 1
            return
        if f.drop and self.rng.random() < f.drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if f.duplicate and self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            if f.long_delay and self.rng.random() < f.long_delay:
                delay = self.rng.randint(1, f.long_delay_max)
            else:
                delay = self.rng.randint(*f.delay)
            heapq.heappush(self.net, (self.now + delay, self._seq, m))
            self._seq += 1
        self.stats["sent"] += 1

    def _deliver_due(self) -> None:
        while self.net and self.net[0][0] <= self.now:
            _, _, m = heapq.heappop(self.net)
            node = self.nodes.get(m.dst)
            if node is None or node.core is None or (m.src, m.dst) in self.blocked:
                continue
            node.inbox.append(m)
            if node.turn_at is None:
                # The runner wakes a little later: messages arriving meanwhile form a batch.
                node.turn_at = self.now + self.rng.randint(0, 3)

    # --- faults and clients ---------------------------------------------------------------

    def _mean_interval(self, name: str) -> int:
        f = self.faults
        return {
            "partition": f.partition_every,
            "crash": f.crash_every,
            "config": f.config_every,
            "transfer": f.transfer_every,
            "propose": f.propose_every,
            "read": f.read_every,
        }[name]

    def _schedule(self, name: str) -> None:
        mean = self._mean_interval(name)
        if mean <= 0:
            self.timers.pop(name, None)
            return
        self.timers[name] = self.now + 1 + int(self.rng.expovariate(1 / mean))

    def _schedule_all_timers(self) -> None:
        for name in TIMERS:
            self._schedule(name)

    def _fire(self, name: str) -> None:
        self._schedule(name)
        if name == "partition":
            self._change_partition()
        elif name == "crash":
            up = [n for n in self.nodes.values() if n.core is not None]
            if up:
                self.crash(self.rng.choice(up), "process killed")
        elif name == "propose":
            self.propose_somewhere()
        elif name == "read":
            self._read()
        elif name == "config":
            self._change_config()
        elif name == "transfer":
            self._transfer()

    def _change_partition(self) -> None:
        ids = self.ids
        kind = self.rng.choice(("heal", "heal", "isolate", "split", "mute", "deaf", "links"))
        blocked: set[tuple[str, str]] = set()
        if kind == "isolate":
            x = self.rng.choice(ids)
            blocked = {(a, b) for a in ids for b in ids if a != b and x in (a, b)}
        elif kind == "split":
            shuffled = ids[:]
            self.rng.shuffle(shuffled)
            cut = self.rng.randint(1, len(ids) // 2)
            left = shuffled[:cut]
            blocked = {(a, b) for a in ids for b in ids if (a in left) != (b in left)}
        elif kind == "mute":  # x hears everyone, nobody hears x
            x = self.rng.choice(ids)
            blocked = {(x, b) for b in ids if b != x}
        elif kind == "deaf":  # everyone hears x, x hears nobody
            x = self.rng.choice(ids)
            blocked = {(a, x) for a in ids if a != x}
        elif kind == "links":  # random one-way link failures
            blocked = {(a, b) for a in ids for b in ids if a != b and self.rng.random() < 0.3}
        self.blocked = blocked
        self.stats["partitions"] += 1
        self._trace("net", "partition", f"{kind}: {sorted(blocked)}")

    def leaders(self) -> list[tuple[str, RaftCore]]:
        return self._leaders()

    def _leaders(self) -> list[tuple[str, RaftCore]]:
        return [
            (n.id, n.core)
            for n in self.nodes.values()
            if n.core is not None and n.core.role == Role.LEADER
        ]

    def _wake(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.turn_at is None:
            node.turn_at = self.now + self.rng.randint(0, 2)

    def propose_somewhere(self) -> tuple[str, int, int] | None:
        leaders = self._leaders()
        if not leaders:
            self.stats["proposals_without_leader"] += 1
            return None
        node_id, core = self.rng.choice(leaders)
        return self.propose_at(node_id, core)

    def propose_at(self, node_id: str, core: RaftCore) -> tuple[str, int, int] | None:
        self._command += 1
        data = b"cmd-%d" % self._command
        try:
            index, term = core.propose(data)
        except RaftError as exc:
            self.stats[f"proposal_refused_{type(exc).__name__}"] += 1
            return None
        self.stats["proposals"] += 1
        self._trace(node_id, "propose", f"{data.decode()} -> ({index}, {term})")
        self._wake(node_id)
        return node_id, index, term

    def _read(self) -> None:
        leaders = self._leaders()
        if not leaders:
            return
        node_id, core = self.rng.choice(leaders)
        self._read_ctx += 1
        self.checker.on_read_started(self._read_ctx, node_id)
        core.read_index(self._read_ctx)
        self.stats["reads"] += 1
        self._trace(node_id, "read", f"ctx={self._read_ctx} max_commit={self.checker.max_commit}")
        self._wake(node_id)

    def _change_config(self) -> None:
        if any(n.disk.rejoining for n in self.nodes.values()):
            return  # a voter that lost its disk counts as failed until it caught up
        leaders = self._leaders()
        if not leaders:
            return
        node_id, core = self.rng.choice(leaders)
        voters = list(core.voters)
        outside = [i for i in self.ids if i not in voters]
        if outside and (len(voters) <= self.min_voters or self.rng.random() < 0.5):
            voters.append(self.rng.choice(outside))
        elif len(voters) > self.min_voters:
            voters.remove(self.rng.choice(voters))
        else:
            return
        try:
            core.propose_config(tuple(voters))
        except RaftError as exc:
            self.stats[f"config_refused_{type(exc).__name__}"] += 1
            return
        self.stats["config_changes"] += 1
        self._trace(node_id, "config", f"propose voters {voters}")
        self._wake(node_id)

    def _transfer(self) -> None:
        leaders = self._leaders()
        if not leaders:
            return
        node_id, core = self.rng.choice(leaders)
        targets = [v for v in core.voters if v != node_id]
        if not targets:
            return
        target = self.rng.choice(targets)
        try:
            core.transfer_leadership(target)
        except RaftError:
            return
        self.stats["transfers"] += 1
        self._trace(node_id, "transfer", f"to {target}")
        self._wake(node_id)

    # --- liveness -----------------------------------------------------------------------

    def heal(self) -> None:
        """Stop every fault, reconnect the network and restart every crashed node."""
        self.faults = replace(CALM, down_time=self.faults.down_time)
        self.blocked = set()
        self._schedule_all_timers()
        self._trace("net", "heal", "all faults stopped")
        for node in self.nodes.values():
            if node.core is None:
                self._start(node)

    def check_liveness(self, max_ticks: int) -> int:
        """After heal(): a leader is elected and a fresh proposal commits within max_ticks.

        Returns the number of ticks it took.
        """
        start = self.now
        deadline = start + max_ticks * TICK
        pending: tuple[str, int, int] | None = None
        for _ in range(max_ticks * TICK * 50):
            if not self.step(until=deadline):
                break
            if pending is not None:
                node = self.nodes[pending[0]]
                core = node.core
                if (
                    core is not None
                    and core.commit >= pending[1]
                    and (
                        core.log.term_at(pending[1]) == pending[2]
                        or (
                            core.log.snapshot_index >= pending[1]
                            and self.checker.committed_term.get(pending[1]) == pending[2]
                        )
                    )
                ):
                    return (self.now - start + TICK - 1) // TICK
                if core is None or core.role != Role.LEADER or core.term != pending[2]:
                    pending = None  # that leader is gone: ask the next one
            if pending is None:
                leaders = self._leaders()
                if leaders:
                    node_id, core = max(leaders, key=lambda lc: lc[1].term)
                    pending = self.propose_at(node_id, core)
        raise LivenessFailure(
            f"no leader committed a fresh proposal within {max_ticks} ticks after healing "
            f"(leaders now: {[(i, c.term) for i, c in self._leaders()]})"
        )

    def check_rejoined(self, max_ticks: int) -> None:
        """After heal(): every node back from a lost disk has caught up within max_ticks
        (a leader that kept counting on its lost log would probe above it forever)."""
        deadline = self.now + max_ticks * TICK

        def stuck() -> list[str]:
            # Only members: a leader replicates to the nodes of its configuration.
            members = {v for _, lead in self._leaders() for v in lead.voters}
            return [n.id for n in self.nodes.values() if n.disk.rejoining and n.id in members]

        for _ in range(max_ticks * TICK * 50):
            if self._leaders() and not stuck():
                return
            if not self.step(until=deadline):
                break
        raise LivenessFailure(f"{stuck()} still rejoining {max_ticks} ticks after healing")

    # --- trace ----------------------------------------------------------------------------

    def _trace(self, node: str, what: str, detail: object) -> None:
        self.trace.append((self.now, node, what, detail))

    def format_trace(self) -> list[str]:
        lines = []
        for t, node, what, detail in self.trace:
            text = _describe_message(detail) if not isinstance(detail, str) else detail
            lines.append(f"  t={t:<6} {node:<4} {what:<9} {text}")
        return lines


def _describe_message(m: object) -> str:
    if isinstance(m, AppendRequest):
        span = f"{m.entries[0].index}..{m.entries[-1].index}" if m.entries else "-"
        return (
            f"Append t{m.term} {m.src}->{m.dst} prev=({m.prev_index},{m.prev_term}) "
            f"entries={span} commit={m.commit} ctx={m.read_ctx}"
        )
    if isinstance(m, AppendResponse):
        return (
            f"AppendResp t{m.term} {m.src}->{m.dst} ok={m.success} match={m.match_index} "
            f"ctx={m.read_ctx}"
        )
    if isinstance(m, VoteRequest):
        kind = "PreVote" if m.prevote else "Vote"
        return (
            f"{kind} t{m.term} {m.src}->{m.dst} last=({m.last_log_index},{m.last_log_term})"
            f"{' transfer' if m.transfer else ''}"
        )
    if isinstance(m, VoteResponse):
        kind = "PreVoteResp" if m.prevote else "VoteResp"
        return f"{kind} t{m.term} {m.src}->{m.dst} granted={m.granted}"
    if isinstance(m, SnapshotRequest):
        meta = m.snapshot.meta
        return f"Snapshot t{m.term} {m.src}->{m.dst} at=({meta.index},{meta.term})"
    if isinstance(m, SnapshotResponse):
        return f"SnapshotResp t{m.term} {m.src}->{m.dst} match={m.match_index}"
    if isinstance(m, TimeoutNow):
        return f"TimeoutNow t{m.term} {m.src}->{m.dst}"
    return repr(m)


def _describe_ready(rd: Ready) -> str:
    parts = []
    if rd.hard_state is not None:
        parts.append(f"hs=({rd.hard_state.term},{rd.hard_state.vote})")
    if rd.snapshot is not None:
        parts.append(f"snapshot={rd.snapshot.meta.index}")
    if rd.entries:
        parts.append(
            f"entries={rd.entries[0].index}..{rd.entries[-1].index}(t{rd.entries[-1].term})"
        )
    if rd.committed:
        parts.append(f"apply={rd.committed[0].index}..{rd.committed[-1].index}")
    if rd.messages:
        parts.append(f"msgs={len(rd.messages)}")
    if rd.read_states:
        parts.append(f"reads={[(r.ctx, r.index) for r in rd.read_states]}")
    return " ".join(parts)


def run_seed(
    seed: int,
    size: int,
    *,
    chaos_ticks: int = 300,
    liveness_ticks: int = 200,
    config: RaftConfig | None = None,
    faults: Faults = CHAOS,
) -> Cluster:
    """Chaos for `chaos_ticks`, then heal and require progress within `liveness_ticks`.

    Raises SimulationFailure (with seed and trace) on any violated property or core error.
    """
    cluster: Cluster | None = None
    try:
        cluster = Cluster(seed, size, config=config, faults=faults)
        cluster.run(chaos_ticks * TICK)
        cluster.heal()
        cluster.check_liveness(liveness_ticks)
        if faults.disk_loss:
            cluster.check_rejoined(liveness_ticks)
        return cluster
    except Exception as exc:  # a violated property, or the core itself raised
        trace = cluster.format_trace() if cluster is not None else []
        raise SimulationFailure(seed, size, exc, trace) from exc
