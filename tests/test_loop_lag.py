"""The event-loop lag monitor records how long a synchronous step held the loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.loop_lag import LoopLagMonitor


class Recorded:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float) -> None:
        self.values.append(amount)


async def test_a_blocking_step_shows_up_as_lag() -> None:
    recorded = Recorded()
    monitor = LoopLagMonitor(recorded, interval=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # noqa: ASYNC251 - holds the loop on purpose, as a long dump would
        await asyncio.sleep(0.1)
    finally:
        await monitor.stop()
    assert recorded.values, "the monitor never ran"
    assert max(recorded.values) >= 0.25
    # Away from the stall the timer fires close to on time.
    assert min(recorded.values) < 0.1
    assert all(v >= 0 for v in recorded.values)


async def test_stop_ends_the_monitor_and_start_twice_runs_one() -> None:
    recorded = Recorded()
    monitor = LoopLagMonitor(recorded, interval=0.01)
    monitor.start()
    monitor.start()
    await asyncio.sleep(0.05)
    await monitor.stop()
    count = len(recorded.values)
    await asyncio.sleep(0.05)
    assert len(recorded.values) == count
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loop-lag"]


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LoopLagMonitor(Recorded(), interval=0)
