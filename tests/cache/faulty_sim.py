"""The seeded cache simulation (`sim.py`) with the faults a real deployment adds: messages
duplicated and lost, and homes restarting in the middle of transactions (not only between
them). Run on the recovering cores (`service.cache.recovery`), whose re-sends must bring
every operation to an end and whose idempotence must keep every read fresh.

Loss stands for everything kill -9 loses: a message persisted-for but not yet sent, or
received but not yet persisted. Duplicates stand for HTTP batches re-sent after a timeout.
Time advances also drive the nodes' re-sends (`RecoveringLineCache.tick`), and a
restarted node re-sends its hand-offs (`recover`).
"""

from __future__ import annotations

import itertools
import random

from service.cache import DirState, State
from service.cache.directory import Directory
from service.cache.lines import LineCache
from service.cache.recovery import RecoveringDirectory, RecoveringLineCache

from .sim import HOME_MESSAGES, Cluster

RESEND_MS = 20
_INCARNATIONS = itertools.count(1)  # every cache object (incarnation) numbers its own reqs


class RecoveringDir(RecoveringDirectory):
    def __init__(self, node: str, *, lease_ms: int = 5_000) -> None:
        super().__init__(node, lease_ms=lease_ms, resend_ms=RESEND_MS)


class RecoveringCache(RecoveringLineCache):
    def __init__(self, node, home_of, **kw) -> None:
        base = next(_INCARNATIONS) * 1_000_000
        super().__init__(node, home_of, resend_ms=RESEND_MS, req_base=base, **kw)


class FaultyCluster(Cluster):
    def __init__(
        self,
        seed: int,
        *,
        dup_rate: float = 0.1,
        loss_rate: float = 0.05,
        directory_class: type[Directory] = RecoveringDir,
        cache_class: type[LineCache] = RecoveringCache,
        **kw,
    ) -> None:
        super().__init__(seed, directory_class=directory_class, cache_class=cache_class, **kw)
        self.dup_rate = dup_rate
        self.loss_rate = loss_rate

    def deliver(self, index: int) -> None:
        send = self.network[index]
        roll = self.rng.random()
        if roll < self.loss_rate:
            self.network.pop(index)
            self.trace.append(f"t={self.now} LOST -> {send.to}: {send.message}")
            self._count("lost")
            return
        if roll < self.loss_rate + self.dup_rate:
            self.network.append(send)  # delivered now and again later
            self._count("duplicated")
        super().deliver(index)

    def advance(self, ms: int) -> None:
        super().advance(ms)
        for name in self.names:
            cache = self.caches[name]
            assert isinstance(cache, RecoveringLineCache)
            self.apply(name, cache.tick(self.now))

    def restart_cache(self, node: str) -> None:
        super().restart_cache(node)
        cache = self.caches[node]
        assert isinstance(cache, RecoveringLineCache)
        self.apply(node, cache.recover())

    def restart_home(self, node: str) -> bool:
        """Any time, even mid-transaction: what it had not persisted is gone."""
        self.trace.append(f"t={self.now} restart home {node} (anytime)")
        self._count("home_restart")
        directory = self.directory_class(node, lease_ms=self.lease_ms)
        for key, fields in sorted(self.dir_disk[node].items()):
            directory.restore(key, fields, self.now)
        self.dirs[node] = directory
        self.apply(node, directory.retire_unused())  # as the service does on start
        return True

    def random_step(self) -> None:
        if self.rng.random() < 0.01:
            self.restart_home(self.rng.choice(self.names))
            return
        super().random_step()

    def busy(self) -> bool:
        if self.ops or self.network:
            return True
        if any(not d.idle() for d in self.dirs.values()):
            return True
        return any(
            isinstance(c, RecoveringLineCache) and c.outstanding() for c in self.caches.values()
        )

    def settle(self, max_steps: int = 50_000) -> None:
        """Deliver everything (no more faults) and let re-sends and leases run, until
        nothing is outstanding anywhere."""
        self.dup_rate = self.loss_rate = 0.0
        for _ in range(max_steps):
            if self.network:
                self.deliver(self.rng.randrange(len(self.network)))
            elif self.busy():
                self.advance(RESEND_MS)
            else:
                break
            self.check_step()
        if self.busy():
            stuck = sorted({(op.node, op.key) for op in self.ops.values()})
            self.fail(f"not quiescent after settling: {len(self.network)} messages, ops {stuck}")

    def check_quiescent(self) -> None:
        """As the base check, except that a home may name as owner a node that holds
        nothing: its grant was lost with a crashed home, or answered a request the node
        no longer had (so it was acknowledged, not installed). Such an owner answers a
        forward with "nothing here" and the home serves its own value, so that value
        must then be the newest anywhere."""
        for key in self.keys:
            entry = self.dirs[self.homes[key]].entry(key)
            for node, cache in self.caches.items():
                line = cache.line(key)
                state = cache.state(key, self.now)
                if line is not None and line.evicting:
                    self.fail(f"{node} still evicting {key!r} with nothing in flight")
                if state in (State.M, State.E) and entry.owner != node:
                    self.fail(f"{node} holds {key!r} in {state} but the home says {entry}")
                if state is State.S:
                    assert line is not None
                    if node not in entry.sharers:
                        self.fail(f"{node} holds {key!r} in S unknown to the home: {entry}")
                    if (line.data, line.version) != (entry.data, entry.version):
                        self.fail(f"{node}'s S copy of {key!r} differs from the home: {entry}")
            if entry.state is DirState.OWNED and entry.owner is not None:
                owner = self.caches[entry.owner]
                if owner.state(key, self.now) not in (State.M, State.E):
                    newest = max(
                        (line.version for c in self.caches.values() if (line := c.line(key))),
                        default=0,
                    )
                    if newest > entry.version:
                        self.fail(
                            f"{entry.owner} holds nothing of {key!r} and the home's "
                            f"value is older than a copy (v{newest}): {entry}"
                        )

    def read_everything(self) -> None:
        """Every node reads every key once more; the checker sees the results."""
        for node in self.names:
            for key in self.keys:
                self.issue(node, key, "read")
        self.settle()


CHURN_KEYS = ("a", "b", "c", "d", "e", "f", "g")


def run(seed: int, steps: int = 1_500, *, churn: bool = False, **kw) -> FaultyCluster:
    """One randomized run. `churn`: more keys than any cache holds and many deletes, so
    that homes keep retiring the entries of deleted keys and bringing them back."""
    shape = random.Random(seed ^ 0xFA17)
    nodes = shape.choice((2, 3, 4))
    if churn:
        kw.setdefault("op_weights", (4, 2, 4))
    keys = CHURN_KEYS if churn else ("a", "b", "c", "d")[: shape.choice((1, 2, 3, 4))]
    cluster = FaultyCluster(
        seed,
        nodes=nodes,
        keys=keys,
        max_entries=shape.choice((1, 2) if churn else (1, 2, 3)),
        max_bytes=shape.choice((12, 64, 1_000)),
        lease_ms=shape.choice((10, 30, 80)),
        policy=shape.choice(("lru", "lfu")),
        slow=tuple(f"n{i}" for i in range(nodes) if shape.random() < 0.3),
        **kw,
    )
    for _ in range(steps):
        cluster.random_step()
        cluster.check_step()
    cluster.settle()
    cluster.check_quiescent()
    cluster.read_everything()
    cluster.checker.assert_ok(f"seed={seed}")
    return cluster


__all__ = ["HOME_MESSAGES", "FaultyCluster", "run"]
