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

`YoungThreshold` makes the youngest generation's collections rarer: Python's default
collects it after every 700 net new container objects, hundreds of times a second at
a few thousand requests a second, each walking what happens to be alive at that moment
(requests in flight, futures, parsed bodies) only to find it is not garbage. At 5,000 a
collection walks more, but by then most of those objects are gone by reference
counting: the lock benchmark ran 2-4% more cycles per second and the queue benchmark's
publish p99 fell from 59-69 to 48-58 ms at 3,000 msgs/s, in runs interleaved with the
default (10,000 and 20,000 did no better, and 20,000 raised the lock p99 by 3-5 ms).

`GcPauseRecorder` reports every collection's pause to a histogram by generation
(`dsync_gc_pause_seconds`), so the effect is visible in production, not only here.
"""

from __future__ import annotations

import asyncio
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
DEFAULT_CHECK_SECONDS = 0.5
# A refreeze that reclaims less than this share of the objects it walked was not worth
# its pause: the next one waits twice as long, up to MAX_BACKOFF times the base interval.
GARBAGE_RATIO_TO_BACK_OFF = 0.01
MAX_BACKOFF = 12


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
    """Freezes what survives: at start, after every automatic full collection, and in a
    full refreeze every `refreeze_seconds`.

    Freezing once at start was not enough: a node whose state then grew (a queue holding
    200,000 unacked messages) had full collections walk all of it again, each time it
    grew by a quarter - 30 collections of up to 0.5-1 s per node, longer than the
    election timeout, so leaders were deposed by their own garbage collector. Now a
    check every `check_seconds` sees whether a full collection ran since the last one
    and, if so, collects the young generations (their garbage is reclaimed, not frozen)
    and freezes the rest: the next full collection walks only what became long-lived
    since, however large the state.

    The refreeze is the one pause that still walks everything (350 ms per node with
    460,000 frozen objects), and it exists only to reclaim cyclic garbage among frozen
    objects, which is rare here (0-190 objects per refreeze under the benchmarks). So
    while refreezes reclaim under `GARBAGE_RATIO_TO_BACK_OFF` of what they walk, the
    interval doubles, up to `MAX_BACKOFF` times `refreeze_seconds`; a refreeze that
    finds more garbage sets it back.
    """

    def __init__(
        self,
        refreeze_seconds: float = DEFAULT_REFREEZE_SECONDS,
        check_seconds: float = DEFAULT_CHECK_SECONDS,
    ) -> None:
        if refreeze_seconds <= 0 or check_seconds <= 0:
            raise ValueError("refreeze_seconds and check_seconds must be positive")
        self.base_seconds = refreeze_seconds
        self.interval_seconds = refreeze_seconds  # until the next refreeze
        self._task = BackgroundTask("gc-refreeze", self._refreezes)
        self._check = BackgroundTask.every(
            "gc-freeze-check", check_seconds, lambda: self.freeze_after_full_collection()
        )
        self._full_collections = _full_collections()
        self.freezes = 0  # freezes after an automatic full collection (for tests, logs)

    def start(self) -> None:
        if not self._task.running:
            self.refreeze()
            self._task.start()
            self._check.start()

    async def stop(self) -> None:
        if self._task.running:
            await self._check.stop()
            await self._task.stop()
            gc.unfreeze()  # leave the process as it found it

    def freeze_after_full_collection(self) -> bool:
        """Freezes if a full collection ran since the last freeze; says whether it did."""
        if _full_collections() == self._full_collections:
            return False
        gc.collect(1)
        gc.freeze()
        self._full_collections = _full_collections()
        self.freezes += 1
        log.debug("gc: froze after a full collection", extra={"frozen": gc.get_freeze_count()})
        return True

    async def _refreezes(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            # Looked up at each run (not bound at start), as a method call would be.
            self.refreeze()

    def refreeze(self) -> None:
        started = time.perf_counter()
        walked = gc.get_freeze_count()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self._full_collections = _full_collections()
        self.interval_seconds = self.next_interval(collected, walked)
        log.info(
            "gc: collected and froze",
            extra={
                "collected": collected,
                "frozen": gc.get_freeze_count(),
                "ms": round((time.perf_counter() - started) * 1000, 1),
                "next_s": self.interval_seconds,
            },
        )

    def next_interval(self, collected: int, walked: int) -> float:
        if collected >= walked * GARBAGE_RATIO_TO_BACK_OFF:
            return self.base_seconds
        return min(self.interval_seconds * 2, self.base_seconds * MAX_BACKOFF)


class YoungThreshold:
    """Sets the first generation's threshold while a node runs, and puts the process's
    back when it stops (tests run several nodes in one process, one after another)."""

    def __init__(self, threshold: int) -> None:
        if threshold < 1:
            raise ValueError("the young generation's threshold must be at least 1")
        self.threshold = threshold
        self._before: tuple[int, int, int] | None = None

    def apply(self) -> None:
        if self._before is None:
            self._before = gc.get_threshold()
            gc.set_threshold(self.threshold, *self._before[1:])

    def restore(self) -> None:
        if self._before is not None:
            gc.set_threshold(*self._before)
            self._before = None


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])
