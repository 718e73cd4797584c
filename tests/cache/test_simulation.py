"""Seeded randomized runs of several nodes' caches and homes over a reordering network,
with restarts, checking coherence after every step (see `sim.py`); plus proof that the
harness catches broken protocols, and a pinned lease scenario.

A failure names its seed (`seed=N` in the message and the test id); replay it with
`sim.run(N)`, and pin it here once fixed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.cache import (
    Directory,
    DirState,
    Inv,
    Line,
    LineCache,
    LocalRead,
    LocalWrite,
    State,
    WriteDone,
)
from service.cache.messages import Message

from . import sim

SEEDS = range(100)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_run_stays_coherent(seed):
    cluster = sim.run(seed)
    assert cluster.checker.reads + cluster.checker.writes > 0


def test_random_runs_exercise_every_path():
    totals: dict[str, int] = {}
    drops = 0
    for seed in range(20):
        cluster = sim.run(seed)
        drops += sum(d.lease_drops for d in cluster.dirs.values())
        for what, n in cluster.counts.items():
            totals[what] = totals.get(what, 0) + n
    wanted = {
        "GetS", "GetM", "Data", "Unblock", "Inv", "InvAck", "FwdGetS", "FwdGetM", "FwdDone",
        "PutS", "PutE", "PutM", "PutAck", "hit", "miss", "cache_restart", "home_restart",
    }  # fmt: skip
    assert wanted <= set(totals), wanted - set(totals)
    assert drops > 0  # some writes completed through lease expiry


def test_a_long_run_stays_coherent():
    sim.run(12345, steps=8_000)


# ---- the harness has teeth ---------------------------------------------------------------


class NoInvWaitDirectory(Directory):
    """Broken: grants M without invalidating the sharers."""

    def _get(self, entry, requester, want, now, out):
        if want is State.M and entry.state is DirState.S:
            for node in sorted(entry.sharers):
                if node != requester:
                    self._drop_sharer(entry, node, out)
        super()._get(entry, requester, want, now, out)


class EternalLeaseCache(LineCache):
    """Broken: shared copies never expire."""

    def _store(self, line: Line, *, used: bool = False) -> None:
        if line.state is State.S:
            line = replace(line, lease_until=10**12)
        super()._store(line, used=used)


class ForgetfulWritebackDirectory(Directory):
    """Broken: drops the value of a PutM write-back."""

    def _adopt(self, entry, data, version):
        pass


@pytest.mark.parametrize(
    "broken",
    [
        {"directory_class": NoInvWaitDirectory},
        {"cache_class": EternalLeaseCache},
        {"directory_class": ForgetfulWritebackDirectory},
    ],
    ids=["no-inv-wait", "eternal-lease", "lost-write-back"],
)
def test_the_simulation_catches_a_broken_protocol(broken):
    for seed in range(30):
        try:
            sim.run(seed, **broken)
        except (sim.SimFailure, AssertionError) as failure:
            assert f"seed={seed}" in str(failure)
            return
    pytest.fail("30 seeds ran clean with a broken protocol")


# ---- a pinned scenario: a silent sharer delays a write by at most one lease ----------------


def test_silent_sharer_delays_a_write_by_at_most_one_lease():
    lease = 50
    homes = {"k": "h"}
    home = Directory("h", lease_ms=lease)
    caches = {n: LineCache(n, homes.__getitem__) for n in ("a", "b", "c")}
    held: list[tuple[str, Message]] = []

    def run(node: str, actions, now: int) -> list[WriteDone]:
        done = []
        for action in actions:
            if hasattr(action, "message"):
                held.append((action.to, action.message))
            elif isinstance(action, WriteDone):
                done.append(action)
        return done

    def pump(now: int, *, hold_for: str = "") -> list[WriteDone]:
        done: list[WriteDone] = []
        while any(to != hold_for for to, _ in held):
            index = next(i for i, (to, _) in enumerate(held) if to != hold_for)
            to, msg = held.pop(index)
            if isinstance(msg, sim.HOME_MESSAGES):
                done += run(to, home.step(msg, now), now)
            else:
                done += run(to, caches[to].step(msg, now), now)
        return done

    # a and b read k at t=0 (b first gets E, then both end up S via a forward)
    run("b", caches["b"].step(LocalRead(1, "k"), 0), 0)
    pump(0)
    run("a", caches["a"].step(LocalRead(2, "k"), 0), 0)
    pump(0)
    assert home.entry("k").state is DirState.S and sorted(home.entry("k").sharers) == ["a", "b"]
    # c writes at t=10; b is unreachable (its messages stay in flight)
    run("c", caches["c"].step(LocalWrite(3, "k", "x"), 10), 10)
    assert pump(10, hold_for="b") == []  # a acked; still waiting for b
    assert [type(m) for to, m in held if to == "b"] == [Inv]  # b's Inv is stuck
    deadline = home.next_deadline()
    assert deadline is not None and deadline <= 10 + lease
    assert caches["b"].state("k", deadline) is State.I  # b's copy stopped serving first
    run("h", home.tick(deadline), deadline)
    assert pump(deadline, hold_for="b") == [WriteDone(3, "k", 1)]
    assert caches["c"].state("k", deadline) is State.M
