"""A one-node Raft runner over in-memory storage, started and leading (runner tests)."""

from __future__ import annotations

import asyncio
import random

from service.kv.machine import KvStateMachine
from service.machines import MachineRegistry
from service.metrics import NodeMetrics
from service.raft.core import RaftCore
from service.raft.runner import RaftRunner
from service.storage.memory import InMemoryRaftStorage, InMemoryStateStore


async def started_leader(
    storage: InMemoryRaftStorage, snapshot_threshold: int = 10_000
) -> RaftRunner:
    """A started runner of node n1 (a kv machine) once it leads and applied its log;
    storage writes are retried for 0.3 s."""
    core = RaftCore("n1", ("n1",), random.Random(1))
    runner = RaftRunner(core, storage, InMemoryStateStore(), MachineRegistry([KvStateMachine()]),
                        NodeMetrics("n1"), tick_seconds=0.01,
                        snapshot_threshold=snapshot_threshold)  # fmt: skip
    runner.storage_retry_seconds = 0.3
    runner.start()
    for _ in range(300):
        if core.role.name == "LEADER" and core.applied >= core.log.last_index:
            return runner
        await asyncio.sleep(0.01)
    raise AssertionError("no leader")
