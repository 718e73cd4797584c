"""Garbage-collector pauses: measured, and kept out of the request path.

A node holds many long-lived objects (lock tombstones, the exactly-once table, cache
lines), and CPython's full (generation 2) collection walks every one of them while
the event loop waits. Measured under lock_bench: 30-62 ms per full collection, one
every 1-4 s on each node, so about one request in a hundred waited for one - most of
the gap between the p50 and the p99 latency.

The policy: once started (after the node has loaded its state), collect fully once and
move every surviving object to the permanent generation (`gc.freeze()`), which later
collections skip. Automatic collections then only walk objects created since, and stay
short. Every `refreeze_seconds` the frozen objects are released, collected in one full
pass, and frozen again: cyclic garbage among frozen objects (rare - most objects here
are freed by reference counting the moment they are dropped) is reclaimed within that
interval, at the cost of one full pause per interval instead of one every few seconds.

`GcPauseRecorder` reports every collection's pause to a histogram by generation
(`dsync_gc_pause_seconds`), so the effect is visible in production, not only here.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from service.background import BackgroundTask

log = logging.getLogger("dsync.gc")

DEFAULT_REFREEZE_SECONDS = 300.0


class GcPauseRecorder:
    """Times every collection through gc.callbacks; install once per process.

    The callback only notes the pause: a collection can start inside any allocation,
    including one made while a metrics lock is held (prometheus_client copies its
    children under a plain Lock when /metrics is scraped), so observing a histogram
    from the callback could wait on that lock forever. `flush` hands the noted pauses
    to `observe` from ordinary code; `start` runs it every `flush_seconds`."""

    def __init__(self, observe: Callable[[int, float], None], flush_seconds: float = 1.0) -> None:
        self._observe = observe
        self._started: float | None = None
        # Bounded: if nobody flushes, the oldest pauses are dropped, not memory.
        self._pending: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._task = BackgroundTask.every("gc-pauses", flush_seconds, self.flush)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            paused = time.perf_counter() - self._started
            self._pending.append((int(info.get("generation", -1)), paused))
            self._started = None

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def flush(self) -> None:
        while self._pending:
            generation, seconds = self._pending.popleft()
            self._observe(generation, seconds)

    def start(self) -> None:
        self.install()
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
        self.uninstall()
        self.flush()



class GcFreezer:
    def __init__(self, refreeze_seconds: float = DEFAULT_REFREEZE_SECONDS) -> None:
        if refreeze_seconds <= 0:
            raise ValueError("refreeze_seconds must be positive")
        # Looked up at each run (not bound now), like a method call in a loop would be.
        self._task = BackgroundTask.every(
            "gc-refreeze", refreeze_seconds, lambda: self.refreeze()
        )

    def start(self) -> None:
        if not self._task.running:
            self.refreeze()
            self._task.start()

    async def stop(self) -> None:
        if self._task.running:
            await self._task.stop()
            gc.unfreeze()  # leave the process as it found it

    def refreeze(self) -> None:
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        log.info(
            "gc: collected and froze",
            extra={
                "collected": collected,
                "frozen": gc.get_freeze_count(),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
