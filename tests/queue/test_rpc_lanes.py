"""Which lane of the batched peer calls each queue RPC takes.

Regression: with every RPC in one lane (4 batches in flight per peer), publishes waiting
for an ISR shrink after a kill -9 filled the lane to the Raft leader, and the proposal
of that very ISR change queued behind them: publishing stalled until timeouts (1.4 s
instead of about 0.6 s). Replication and proposals each have a lane of their own now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from service.metrics import NodeMetrics
from service.queue.service import QueueService
from service.queue.store import MemoryPartitionStore
from service.transport.calls import CallBatcher


class RecordingBatcher(CallBatcher):
    def __init__(self) -> None:
        super().__init__("n1")
        self.lanes: dict[str, str] = {}

    async def call(
        self, url: str, name: str, args: Mapping[str, Any], *, lane: str = "default"
    ) -> tuple[int, Any]:
        self.lanes[name] = lane
        return 200, []


@pytest.mark.parametrize(
    ("rpc", "lane"),
    [
        ("replicate", "replication"),
        ("propose", "control"),
        ("publish", "default"),
        ("consume", "default"),
        ("settle", "default"),
    ],
)
async def test_rpcs_that_publishes_wait_on_do_not_share_their_lane(rpc: str, lane: str) -> None:
    service = QueueService("n1", NodeMetrics("n1"), MemoryPartitionStore())
    batcher = RecordingBatcher()
    service.calls = batcher
    service.peer_urls = {"n2": "http://127.0.0.1:1"}
    assert await service._rpc("n2", rpc, {}) == (200, [])
    assert batcher.lanes == {f"queue.{rpc}": lane}
