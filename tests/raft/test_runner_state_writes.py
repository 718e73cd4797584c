"""The runner's background writes of applied state: paced, merged, and prompt when quiet."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence

from service.kv.machine import KvStateMachine
from service.machines import MachineRegistry
from service.metrics import NodeMetrics
from service.raft.core import RaftCore
from service.raft.runner import RaftRunner
from service.statemachine import Command
from service.storage.memory import InMemoryRaftStorage, InMemoryStateStore
from service.storage.protocols import HashWrite

DELAY = 0.5


class RecordingStateStore(InMemoryStateStore):
    """Remembers when each write arrived and what it carried."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, int, list[HashWrite]]] = []

    async def apply(self, writes: Sequence[HashWrite], applied_index: int) -> None:
        self.writes.append((asyncio.get_running_loop().time(), applied_index, list(writes)))
        await super().apply(writes, applied_index)


async def start_runner(state: RecordingStateStore) -> RaftRunner:
    core = RaftCore("n1", ("n1",), random.Random(1))
    runner = RaftRunner(
        core,
        InMemoryRaftStorage(),
        state,
        MachineRegistry([KvStateMachine()]),
        NodeMetrics("n1"),
        tick_seconds=0.01,
        state_write_delay=DELAY,
    )
    runner.start()
    for _ in range(200):
        if runner.status().role.name == "LEADER":
            return runner
        await asyncio.sleep(0.01)
    raise AssertionError("a single-node runner did not become leader")


def put(key: str, value: str) -> Command:
    return Command("kv.put", {"key": key, "value": value}, None, 0)


async def wait_applied_in_store(state: RecordingStateStore, index: int, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await state.load_applied_index() >= index:
            return loop.time()
        await asyncio.sleep(0.005)
    raise AssertionError(f"applied index {index} not written within {timeout} s")


async def test_after_a_quiet_spell_the_state_is_written_at_once() -> None:
    state = RecordingStateStore()
    runner = await start_runner(state)
    try:
        await asyncio.sleep(DELAY * 1.5)  # longer than the pacing interval: quiet
        loop = asyncio.get_running_loop()
        started = loop.time()
        await runner.propose(put("a", "1"), timeout=5)
        index = runner.core.applied
        written = await wait_applied_in_store(state, index, timeout=5)
        # Well within one pacing interval: it was not held back.
        assert written - started < DELAY / 2
        assert (await state.load_prefix("dsync:kv:"))["dsync:kv:a"]["value"] == "1"
    finally:
        await runner.stop()


async def test_under_load_writes_are_paced_and_each_key_written_once() -> None:
    state = RecordingStateStore()
    runner = await start_runner(state)
    try:
        await asyncio.sleep(DELAY * 1.5)
        before = len(state.writes)
        # Many applied batches in quick succession, the same key rewritten each time.
        for i in range(20):
            await runner.propose(put("hot", str(i)), timeout=5)
            await asyncio.sleep(DELAY / 20)
        await wait_applied_in_store(state, runner.core.applied, timeout=5)
        ours = state.writes[before:]
        # 20 batches over about one interval: at most a few writes, not 20.
        assert 1 <= len(ours) <= 4, [w[1] for w in ours]
        starts = [at for at, _, _ in ours]
        # Successive writes start at least one interval apart (a little timer slack).
        assert all(b - a >= DELAY * 0.9 for a, b in itertools.pairwise(starts))
        # Merged: within one write the hot key appears once, and the last value wins.
        for _, _, writes in ours:
            assert sum(1 for w in writes if w.key == "dsync:kv:hot") <= 1
        assert (await state.load_prefix("dsync:kv:"))["dsync:kv:hot"]["value"] == "19"
    finally:
        await runner.stop()
