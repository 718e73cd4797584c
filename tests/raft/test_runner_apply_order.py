"""Committed entries already durable in the node's log are applied before the runner's
next write, not after it: each answer used to wait for one more fsync."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from service.kv.machine import KvStateMachine
from service.machines import MachineRegistry
from service.metrics import NodeMetrics
from service.raft.core import RaftCore
from service.raft.messages import Entry, HardState, Ready, Snapshot, SnapshotMeta
from service.raft.runner import RaftRunner, _stable_prefix
from service.statemachine import Command
from service.storage.memory import InMemoryRaftStorage, InMemoryStateStore

WRITE = 0.3  # how long each log write takes in these tests


class SlowStorage(InMemoryRaftStorage):
    """Every write of entries takes WRITE seconds (a slow fsync)."""

    async def persist(
        self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None
    ) -> None:
        if entries:
            await asyncio.sleep(WRITE)
        await super().persist(hard_state, entries, snapshot)


def put(key: str, value: str) -> Command:
    return Command("kv.put", {"key": key, "value": value}, None, 0)


async def test_an_answer_does_not_wait_for_the_write_of_later_entries() -> None:
    kv = KvStateMachine()
    core = RaftCore("n1", ("n1",), random.Random(1))
    runner = RaftRunner(
        core, SlowStorage(), InMemoryStateStore(), MachineRegistry([kv]), NodeMetrics("n1"),
        tick_seconds=0.01,
    )  # fmt: skip
    runner.start()
    try:
        for _ in range(300):
            if core.role.name == "LEADER" and core.applied >= core.log.last_index:
                break
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(runner.propose(put("k", "first"), timeout=5))
        await asyncio.sleep(WRITE / 3)  # the first entry's write is under way
        second = asyncio.ensure_future(runner.propose(put("k", "second"), timeout=5))
        await first
        # Its own write, not that one and the second entry's after it.
        assert loop.time() - started < WRITE * 1.6
        assert not second.done()
        await second
        assert loop.time() - started >= WRITE * 2
        stored = kv.get("k")
        assert stored is not None and stored[0] == "second"
    finally:
        await runner.stop()


def entries(*indexes: int) -> list[Entry]:
    return [Entry(i, 1) for i in indexes]


def test_only_entries_before_those_a_ready_writes_count_as_durable() -> None:
    committed = entries(5, 6, 7)
    assert _stable_prefix(Ready(committed=committed)) == 3
    assert _stable_prefix(Ready(committed=committed, entries=entries(7, 8))) == 2
    assert _stable_prefix(Ready(committed=committed, entries=entries(5, 6, 7, 8))) == 0
    assert _stable_prefix(Ready(committed=committed, entries=entries(4, 5))) == 0
    assert _stable_prefix(Ready(committed=committed, entries=entries(9))) == 3
    assert _stable_prefix(Ready(committed=[], entries=entries(9))) == 0
    snapshot = Snapshot(SnapshotMeta(4, 1, ("n1",)), b"")
    assert _stable_prefix(Ready(committed=committed, snapshot=snapshot)) == 0
