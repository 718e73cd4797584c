"""What a client learns when the runner stops under it: a command that never entered
the log did not apply (retry freely); one that did may still be committed by the next
leader, so its outcome is unknown (retry only with the same request_id)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.api.http import raft_error
from service.kv.machine import KvStateMachine
from service.raft.messages import Entry, HardState, Snapshot
from service.raft.runner import (
    STORAGE_STALL_SECONDS,
    OutcomeUnknown,
    RunnerStopped,
    StorageStalled,
)
from service.statemachine import Command
from service.storage.memory import InMemoryRaftStorage

from .single_node import started_leader


class FailingStorage(InMemoryRaftStorage):
    """Writes succeed until `fail` is set; then every write of entries fails, as when
    the disk under Redis is full."""

    fail = False

    async def persist(
        self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None
    ) -> None:
        if self.fail and entries:
            raise ConnectionError("Connection closed by server.")
        await super().persist(hard_state, entries, snapshot)


def put(key: str) -> Command:
    return Command("kv.put", {"key": key, "value": "v"}, None, 0)


async def test_a_command_in_the_log_when_storage_fails_has_an_unknown_outcome() -> None:
    storage = FailingStorage()
    runner = await started_leader(storage)
    try:
        await runner.propose(put("before"), timeout=2)  # storage works
        storage.fail = True
        with pytest.raises(OutcomeUnknown):
            await runner.propose(put("during"), timeout=5)
        assert runner.fatal_error is not None
        # Once stopped, a new command never enters the log: plainly not applied.
        with pytest.raises(RunnerStopped) as refused:
            await runner.propose(put("after"), timeout=1)
        assert not isinstance(refused.value, OutcomeUnknown)
    finally:
        # The failure is in fatal_error; stop() must not raise it again: the node's
        # shutdown would stop there, leaving its server and Redis running (a disk-full
        # test run once hung on exit that way).
        await runner.stop()


def test_the_api_tells_unknown_outcomes_from_refusals() -> None:
    unknown = raft_error(OutcomeUnknown("raft loop failed"))
    refused = raft_error(RunnerStopped("node is shutting down"))
    assert unknown is not None and refused is not None
    assert (unknown.status, refused.status) == (503, 503)
    assert "outcome is unknown" in unknown.message and "request_id" in unknown.message
    assert "outcome" not in refused.message


async def test_failing_storage_writes_are_noted_until_one_succeeds() -> None:
    storage = FailingStorage()
    runner = await started_leader(storage)
    runner.storage_retry_seconds = 5.0  # long enough to ride out the failure below
    try:
        assert runner.storage_failing_since is None
        storage.fail = True
        proposal = asyncio.ensure_future(runner.propose(put("k"), timeout=5))
        for _ in range(100):
            if runner.storage_failing_since is not None:
                break
            await asyncio.sleep(0.01)
        assert runner.storage_failing_since is not None
        storage.fail = False  # the Redis supervisor brought it back, say
        await proposal
        assert runner.storage_failing_since is None
        assert runner.fatal_error is None
    finally:
        await runner.stop()


async def test_a_stalled_log_answers_waiting_commands_early_and_the_node_recovers() -> None:
    storage = FailingStorage()
    runner = await started_leader(storage)
    runner.storage_retry_seconds = 5.0
    loop = asyncio.get_running_loop()
    try:
        storage.fail = True
        started = loop.time()
        with pytest.raises(OutcomeUnknown):
            await runner.propose(put("in-flight"), timeout=10)
        waited = loop.time() - started
        assert STORAGE_STALL_SECONDS <= waited < STORAGE_STALL_SECONDS + 1.0
        # While stalled, new commands are refused at once: they never enter the log.
        with pytest.raises(StorageStalled):
            await runner.propose(put("refused"), timeout=10)
        with pytest.raises(StorageStalled):
            await runner.read_barrier(timeout=10)
        # Writes work again before the retry budget is spent: the node goes on, and
        # the command whose outcome was unknown did apply.
        storage.fail = False
        for _ in range(300):
            if runner.storage_failing_since is None:
                break
            await asyncio.sleep(0.01)
        assert runner.fatal_error is None
        await runner.propose(put("after"), timeout=5)
        kv = runner.machines.machines[0]
        assert isinstance(kv, KvStateMachine)
        assert kv.get("in-flight") is not None and kv.get("refused") is None
    finally:
        await runner.stop()
