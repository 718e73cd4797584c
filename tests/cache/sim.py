"""An in-process cluster for the cache cores: several nodes, each with a LineCache and a
Directory, joined by a network that delivers messages in random order.

Everything random comes from one seeded `random.Random`, so a failing run is replayed
by its seed. Nodes may be slow (their messages are often passed over) and restart from
what they persisted (cache nodes at any time; homes only between transactions, see
`restart_home`). After every step the history checker sees every node's line states;
every completed read and write is recorded with its start and end time.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from service.cache import (
    Action,
    Directory,
    DirState,
    FwdDone,
    GetM,
    GetS,
    HistoryChecker,
    InvAck,
    LineCache,
    LocalDelete,
    LocalRead,
    LocalWrite,
    Message,
    PersistEntry,
    PersistLine,
    PutE,
    PutM,
    PutS,
    ReadDone,
    Send,
    State,
    Unblock,
    WriteDone,
)
from service.cache.eviction import PolicyName
from service.cache.values import encode

HOME_MESSAGES = (GetS, GetM, PutS, PutE, PutM, InvAck, FwdDone, Unblock)


@dataclass
class PendingOp:
    node: str
    key: str
    write: bool
    data: str | None  # what a write writes (JSON text; None deletes)
    start_ms: int


class SimFailure(AssertionError):
    pass


class Cluster:
    def __init__(
        self,
        seed: int,
        *,
        nodes: int = 3,
        keys: tuple[str, ...] = ("a", "b", "c"),
        max_entries: int = 2,
        max_bytes: int = 64,
        lease_ms: int = 30,
        policy: PolicyName = "lru",
        slow: tuple[str, ...] = (),
        directory_class: type[Directory] = Directory,
        cache_class: type[LineCache] = LineCache,
        op_weights: tuple[int, int, int] = (6, 3, 1),  # read, write, delete
    ) -> None:
        self.op_weights = op_weights
        self.directory_class = directory_class
        self.cache_class = cache_class
        self.seed = seed
        self.rng = random.Random(seed)
        self.names = [f"n{i}" for i in range(nodes)]
        self.keys = keys
        self.homes = {k: self.names[i % nodes] for i, k in enumerate(keys)}
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.lease_ms = lease_ms
        self.policy: PolicyName = policy
        self.slow = set(slow)
        self.now = 0
        self.caches = {n: self._new_cache(n) for n in self.names}
        self.dirs = {n: directory_class(n, lease_ms=lease_ms) for n in self.names}
        self.line_disk: dict[str, dict[str, dict[str, str]]] = {n: {} for n in self.names}
        self.dir_disk: dict[str, dict[str, dict[str, str]]] = {n: {} for n in self.names}
        self.network: list[Send] = []
        self.ops: dict[int, PendingOp] = {}
        self.next_op = 0
        self.checker = HistoryChecker()
        self.trace: deque[str] = deque(maxlen=80)
        self.counts: dict[str, int] = {}

    # ---- plumbing -------------------------------------------------------------------------

    def _new_cache(self, node: str) -> LineCache:
        return self.cache_class(
            node,
            self.homes.__getitem__,
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
            policy=self.policy,
        )

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def apply(self, node: str, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case PersistLine(key=key, fields=fields):
                    if fields is None:
                        self.line_disk[node].pop(key, None)
                    else:
                        self.line_disk[node][key] = dict(fields)
                case PersistEntry(key=key, fields=fields):
                    if fields is None:
                        self.dir_disk[node].pop(key, None)
                        self._count("retired")
                    else:
                        self.dir_disk[node][key] = dict(fields)
                case Send():
                    self.network.append(action)
                    self._count(type(action.message).__name__)
                case ReadDone():
                    op = self.ops.pop(action.op)
                    self._count("hit" if action.hit else "miss")
                    self.trace.append(
                        f"t={self.now} {node} read {op.key} -> v{action.version} {action.data}"
                    )
                    self.checker.record_read(
                        node, op.key, action.data, action.version, op.start_ms, self.now
                    )
                case WriteDone():
                    op = self.ops.pop(action.op)
                    self.trace.append(f"t={self.now} {node} wrote {op.key} v{action.version}")
                    self.checker.record_write(
                        node, op.key, op.data, action.version, op.start_ms, self.now
                    )

    def deliver(self, index: int) -> None:
        send = self.network.pop(index)
        msg: Message = send.message
        self.trace.append(f"t={self.now} -> {send.to}: {msg}")
        if isinstance(msg, HOME_MESSAGES):
            self.apply(send.to, self.dirs[send.to].step(msg, self.now))
        else:
            self.apply(send.to, self.caches[send.to].step(msg, self.now))

    # ---- what can happen in one step ----------------------------------------------------------

    def issue(self, node: str, key: str, kind: str) -> None:
        op = self.next_op
        self.next_op += 1
        if kind == "read":
            self.ops[op] = PendingOp(node, key, False, None, self.now)
            event: LocalRead | LocalWrite | LocalDelete = LocalRead(op, key)
        elif kind == "write":
            value = f"{node}#{op}"
            self.ops[op] = PendingOp(node, key, True, encode(value), self.now)
            event = LocalWrite(op, key, value)
        else:
            self.ops[op] = PendingOp(node, key, True, None, self.now)
            event = LocalDelete(op, key)
        self.trace.append(f"t={self.now} {node} issues {kind} {key} (op {op})")
        self.apply(node, self.caches[node].step(event, self.now))

    def advance(self, ms: int) -> None:
        self.now += ms
        for name in self.names:
            self.apply(name, self.dirs[name].tick(self.now))

    def restart_cache(self, node: str) -> None:
        """kill -9 and restart a node's cache: unfinished ops are lost (clients time out)."""
        self.trace.append(f"t={self.now} restart cache {node}")
        self._count("cache_restart")
        for op_id in [i for i, op in self.ops.items() if op.node == node]:
            del self.ops[op_id]
        cache = self._new_cache(node)
        for key, fields in sorted(self.line_disk[node].items()):
            cache.restore(key, fields)
        self.caches[node] = cache

    def restart_home(self, node: str) -> bool:
        """Restart a home from its hashes; only between transactions (see the report)."""
        if not self.dirs[node].idle():
            return False
        self.trace.append(f"t={self.now} restart home {node}")
        self._count("home_restart")
        directory = self.directory_class(node, lease_ms=self.lease_ms)
        for key, fields in sorted(self.dir_disk[node].items()):
            directory.restore(key, fields, self.now)
        self.dirs[node] = directory
        self.apply(node, directory.retire_unused())  # as the service does on start
        return True

    def random_step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.30:
            node = rng.choice(self.names)
            if sum(op.node == node for op in self.ops.values()) < 3:
                kind = rng.choices(("read", "write", "delete"), self.op_weights)[0]
                self.issue(node, rng.choice(self.keys), kind)
        elif roll < 0.85:
            if self.network:
                index = rng.randrange(len(self.network))
                if self.network[index].to in self.slow and rng.random() < 0.85:
                    return
                self.deliver(index)
        elif roll < 0.97:
            self.advance(rng.choice((1, 2, 5, self.lease_ms // 2, self.lease_ms)))
        elif roll < 0.99:
            self.restart_cache(rng.choice(self.names))
        else:
            self.restart_home(rng.choice(self.names))

    # ---- checking ------------------------------------------------------------------------------

    def check_step(self) -> None:
        states = {
            n: {k: s.value for k, s in c.states(self.now).items()} for n, c in self.caches.items()
        }
        self.checker.record_states(self.now, states)
        if self.checker.violations:
            self.fail("coherence violated")

    def fail(self, why: str) -> None:
        violations = "\n  ".join(str(v) for v in self.checker.violations[:5])
        trace = "\n    ".join(self.trace)
        raise SimFailure(
            f"{why} (seed={self.seed}, t={self.now})\n  {violations}\n  last events:\n    {trace}"
        )

    def settle(self, max_steps: int = 20_000) -> None:
        """Deliver everything and let leases run out, until nothing is left to do."""
        for _ in range(max_steps):
            if self.network:
                self.deliver(self.rng.randrange(len(self.network)))
            elif any(d.next_deadline() is not None for d in self.dirs.values()):
                self.advance(self.lease_ms)
            else:
                break
            self.check_step()
        if self.network or self.ops:
            stuck = sorted({(op.node, op.key) for op in self.ops.values()})
            self.fail(f"not quiescent after settling: {len(self.network)} messages, ops {stuck}")

    def check_quiescent(self) -> None:
        """With no message in flight, the directories and the lines agree exactly."""
        for key in self.keys:
            entry = self.dirs[self.homes[key]].entry(key)
            held = {n: c.line(key) for n, c in self.caches.items()}
            valid = {n: c.state(key, self.now) for n, c in self.caches.items()}
            for node, line in held.items():
                if line is not None and line.evicting:
                    self.fail(f"{node} still evicting {key!r} with nothing in flight")
            if entry.state is DirState.OWNED:
                owner = entry.owner or ""
                if valid[owner] not in (State.M, State.E):
                    self.fail(f"home says {owner} owns {key!r} but its line is {valid[owner]}")
            for node, state in valid.items():
                line = held[node]
                if state in (State.M, State.E) and entry.owner != node:
                    self.fail(f"{node} holds {key!r} in {state} but the home says {entry}")
                if state is State.S:
                    assert line is not None
                    if node not in entry.sharers:
                        self.fail(f"{node} holds {key!r} in S unknown to the home: {entry}")
                    if (line.data, line.version) != (entry.data, entry.version):
                        self.fail(f"{node}'s S copy of {key!r} differs from the home: {entry}")


def run(
    seed: int,
    steps: int = 1_500,
    *,
    directory_class: type[Directory] = Directory,
    cache_class: type[LineCache] = LineCache,
) -> Cluster:
    """One randomized run; its shape (size, capacity, lease, policy) also comes from `seed`."""
    shape = random.Random(seed ^ 0x5EED)
    nodes = shape.choice((2, 3, 4))
    cluster = Cluster(
        seed,
        nodes=nodes,
        keys=("a", "b", "c", "d")[: shape.choice((1, 2, 3, 4))],
        max_entries=shape.choice((1, 2, 3)),
        max_bytes=shape.choice((12, 64, 1_000)),
        lease_ms=shape.choice((10, 30, 80)),
        policy=shape.choice(("lru", "lfu")),
        slow=tuple(f"n{i}" for i in range(nodes) if shape.random() < 0.3),
        directory_class=directory_class,
        cache_class=cache_class,
    )
    for _ in range(steps):
        cluster.random_step()
        cluster.check_step()
    cluster.settle()
    cluster.check_quiescent()
    cluster.checker.assert_ok(f"seed={seed}")
    return cluster
