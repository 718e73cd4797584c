"""Event-loop lag: how late a timer fires, measured continuously.

Everything a node does runs on one asyncio loop, so a long synchronous step (a snapshot
dump, a large JSON body, a GC pause) delays every request and every Raft message behind
it. The monitor sleeps a fixed interval and records how much later than asked it woke;
`dsync_event_loop_lag_seconds` shows the distribution, and its high buckets say how often
the node stalled and for how long.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from service.background import BackgroundTask


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LoopLagMonitor:
    def __init__(self, observer: Observer, interval: float = 0.1) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._observer = observer
        self._interval = interval
        self._task = BackgroundTask("loop-lag", self._run)

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            self._observer.observe(max(0.0, loop.time() - asked))
