"""Event-loop lag: how late a timer fires, measured continuously.

Everything a node does runs on one asyncio loop, so a long synchronous step (a snapshot
dump, a large JSON body, a GC pause) delays every request and every Raft message behind
it. The monitor sleeps a fixed interval and records how much later than asked it woke;
`dsync_event_loop_lag_seconds` shows the distribution, and its high buckets say how often
the node stalled and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LoopLagMonitor:
    def __init__(self, observer: Observer, interval: float = 0.1) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._observer = observer
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            self._observer.observe(max(0.0, loop.time() - asked))
