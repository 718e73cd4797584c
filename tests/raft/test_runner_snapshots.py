"""Snapshots are written to storage off the loop's turn: the node keeps committing while
its snapshot is written, compacts its log once the write is done, and still stops when
the write fails."""

from __future__ import annotations

import asyncio

from service.raft.messages import Snapshot
from service.raft.runner import OutcomeUnknown, RunnerStopped, decode_snapshot_data
from service.statemachine import Command
from service.storage.memory import InMemoryRaftStorage

from .single_node import started_leader

THRESHOLD = 20


class SlowSnapshotStorage(InMemoryRaftStorage):
    """Snapshot writes wait for `release` (a disk busy with a large snapshot); `broken`
    makes them fail instead."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.writing = asyncio.Event()
        self.broken = False

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self.writing.set()
        if self.broken:
            raise ConnectionError("Connection closed by server.")
        await self.release.wait()
        await super().save_snapshot(snapshot)


def put(i: int) -> Command:
    return Command("kv.put", {"key": f"k{i}", "value": str(i)}, None, 0)


async def test_commands_commit_while_a_snapshot_is_written_and_the_log_compacts_after() -> None:
    storage = SlowSnapshotStorage()
    runner = await started_leader(storage, THRESHOLD)
    try:
        i = 0
        while not storage.writing.is_set() and i < 10 * THRESHOLD:
            await runner.propose(put(i), timeout=2)
            i += 1
        assert storage.writing.is_set(), "a snapshot write began"
        first_log_index = runner.core.log.snapshot_index
        # The write is stuck; commands still commit, and a second snapshot does not
        # start while the first is being written.
        for j in range(2 * THRESHOLD):
            await asyncio.wait_for(runner.propose(put(i + j), timeout=2), 2)
        assert runner.core.log.snapshot_index == first_log_index, "compacted only when saved"
        assert await storage.load_snapshot() is None
        storage.release.set()
        for _ in range(200):
            saved = await storage.load_snapshot()
            if saved is not None and runner.core.log.snapshot_index == saved.meta.index:
                break
            await asyncio.sleep(0.01)
        assert saved is not None and runner.core.log.snapshot_index == saved.meta.index
        assert saved.meta.index >= THRESHOLD
        assert "kv:k0" in str(decode_snapshot_data(saved.data))
        # Later snapshots follow, one at a time.
        for j in range(2 * THRESHOLD):
            await runner.propose(put(1_000 + j), timeout=2)
        for _ in range(200):
            latest = await storage.load_snapshot()
            if latest is not None and latest.meta.index > saved.meta.index:
                break
            await asyncio.sleep(0.01)
        assert latest is not None and latest.meta.index > saved.meta.index
    finally:
        storage.release.set()
        await runner.stop()


async def test_a_snapshot_write_that_fails_stops_the_node_as_before() -> None:
    storage = SlowSnapshotStorage()
    storage.broken = True
    runner = await started_leader(storage, THRESHOLD)
    try:
        for i in range(10 * THRESHOLD):
            try:
                await runner.propose(put(i), timeout=2)
            except (RunnerStopped, OutcomeUnknown):  # the loop failed under it
                break
            if runner.fatal_error is not None:
                break
        for _ in range(200):
            if runner.fatal_error is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(runner.fatal_error, ConnectionError)
    finally:
        await runner.stop()
