"""The GC policy: pauses are measured, and the freezer freezes, refreezes and lets go."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from service.gc_policy import GcFreezer, GcPauseRecorder


def test_every_collection_is_reported_with_its_generation() -> None:
    seen: list[tuple[int, float]] = []
    recorder = GcPauseRecorder(lambda generation, seconds: seen.append((generation, seconds)))
    recorder.install()
    recorder.install()  # installing twice reports once
    try:
        gc.collect(0)
        gc.collect()
    finally:
        recorder.uninstall()
    assert seen == [], "nothing is observed from inside the collector"
    recorder.flush()
    assert [g for g, _ in seen][-2:] == [0, 2]
    assert all(seconds >= 0 for _, seconds in seen)
    count = len(seen)
    gc.collect()
    recorder.flush()
    assert len(seen) == count, "still reporting after uninstall"


def test_a_collection_inside_a_held_metrics_lock_does_not_take_it() -> None:
    """Regression: the callback observed the histogram directly, and prometheus_client
    copies a metric's children under a plain Lock when /metrics is scraped; a collection
    starting inside that copy would have waited on the lock its own thread held."""
    metrics_lock = threading.Lock()
    taken_while_held: list[bool] = []

    def observe(generation: int, seconds: float) -> None:
        acquired = metrics_lock.acquire(blocking=False)
        taken_while_held.append(not acquired)
        if acquired:
            metrics_lock.release()

    recorder = GcPauseRecorder(observe)
    recorder.install()
    try:
        with metrics_lock:
            gc.collect()  # as if an allocation under the lock started a collection
    finally:
        recorder.uninstall()
    recorder.flush()
    assert taken_while_held and not any(taken_while_held)


async def test_started_it_flushes_on_its_own_and_stop_flushes_the_rest() -> None:
    seen: list[int] = []
    recorder = GcPauseRecorder(lambda generation, _: seen.append(generation), flush_seconds=0.02)
    recorder.start()
    try:
        gc.collect()
        await asyncio.sleep(0.1)
        assert 2 in seen, "the background flush reported the full collection"
        gc.collect(1)
    finally:
        await recorder.stop()
    assert seen[-1] == 1, "stop() reports what was still pending"
    assert recorder._callback not in gc.callbacks


async def test_the_freezer_freezes_refreezes_on_schedule_and_unfreezes_on_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    freezer = GcFreezer(refreeze_seconds=0.05)
    rounds: list[int] = []
    real = freezer.refreeze

    def counting() -> None:
        real()
        rounds.append(gc.get_freeze_count())

    monkeypatch.setattr(freezer, "refreeze", counting)
    try:
        freezer.start()
        assert rounds and rounds[0] > 0, "start() freezes what survives a collection"
        await asyncio.sleep(0.3)
        assert len(rounds) >= 3, "the refreeze runs every interval"
    finally:
        await freezer.stop()
    assert gc.get_freeze_count() == 0
    after = len(rounds)
    await asyncio.sleep(0.15)
    assert len(rounds) == after, "stopped: no more refreezes"


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        GcFreezer(0)
