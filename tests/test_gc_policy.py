"""The GC policy: pauses are measured, and the freezer freezes, refreezes and lets go."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from service.gc_policy import MAX_BACKOFF, GcFreezer, GcPauseRecorder, YoungThreshold


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
        # Refreezes that find little garbage back off (0.05, 0.1, 0.2 s, ...): wait for
        # two more, however slow this machine is right now.
        for _ in range(300):
            if len(rounds) >= 3:
                break
            await asyncio.sleep(0.01)
        assert len(rounds) >= 3, "the refreeze runs again and again"
    finally:
        await freezer.stop()
    assert gc.get_freeze_count() == 0
    after = len(rounds)
    await asyncio.sleep(0.15)
    assert len(rounds) == after, "stopped: no more refreezes"


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        GcFreezer(0)
    with pytest.raises(ValueError):
        GcFreezer(10, check_seconds=0)


class _Node:
    """A GC-tracked object that can sit in a reference cycle and be watched by weakref."""

    def __init__(self) -> None:
        self.other: object = self


def test_after_a_full_collection_the_survivors_are_frozen_and_young_garbage_is_not() -> None:
    freezer = GcFreezer(refreeze_seconds=3600)
    try:
        assert not freezer.freeze_after_full_collection(), "no full collection yet"
        state = [[i] for i in range(20_000)]  # long-lived state that grew
        gc.collect()  # as the collector's automatic full collection would
        frozen_before = gc.get_freeze_count()
        garbage = _Node()  # a cycle that died young, after the collection
        dead = weakref.ref(garbage)
        del garbage
        assert freezer.freeze_after_full_collection()
        assert freezer.freezes == 1
        assert gc.get_freeze_count() >= frozen_before + len(state), "the state was frozen"
        assert dead() is None, "young cyclic garbage was collected, not frozen"
        assert not freezer.freeze_after_full_collection(), "once per full collection"
        gc.collect(1)
        assert not freezer.freeze_after_full_collection(), "young collections do not count"
    finally:
        gc.unfreeze()


async def test_started_it_checks_for_full_collections_on_its_own() -> None:
    freezer = GcFreezer(refreeze_seconds=3600, check_seconds=0.01)
    try:
        freezer.start()
        assert freezer.freezes == 0, "the start's own full collection is not counted twice"
        gc.collect()
        for _ in range(200):
            if freezer.freezes:
                break
            await asyncio.sleep(0.01)
        assert freezer.freezes == 1
    finally:
        await freezer.stop()
    assert gc.get_freeze_count() == 0


def test_refreezes_back_off_while_they_find_little_garbage() -> None:
    freezer = GcFreezer(refreeze_seconds=10)
    intervals = []
    for _ in range(6):
        freezer.interval_seconds = freezer.next_interval(collected=5, walked=100_000)
        intervals.append(freezer.interval_seconds)
    assert intervals == [20, 40, 80, 120, 120, 120], "doubling up to MAX_BACKOFF times base"
    assert MAX_BACKOFF * 10 == 120
    assert freezer.next_interval(collected=1_000, walked=100_000) == 10, "1% garbage: back"
    assert freezer.next_interval(collected=999, walked=100_000) == 120


def test_a_refreeze_sets_the_next_interval_from_what_it_collected() -> None:
    freezer = GcFreezer(refreeze_seconds=10)
    try:
        freezer.refreeze()
        for _ in range(3):
            garbage = _Node()
            dead = weakref.ref(garbage)
            gc.freeze()  # a cycle that was alive when frozen and died later
            del garbage
            assert dead() is not None, "frozen: no automatic collection reclaims it"
        interval = freezer.interval_seconds
        freezer.refreeze()
        assert dead() is None, "the refreeze reclaims cyclic garbage among frozen objects"
        assert freezer.interval_seconds == min(interval * 2, 120), "little garbage: longer"
    finally:
        gc.unfreeze()


def test_young_threshold_is_set_while_applied_and_the_old_one_comes_back() -> None:
    before = gc.get_threshold()
    young = YoungThreshold(before[0] + 4321)
    young.apply()
    try:
        assert gc.get_threshold() == (before[0] + 4321, *before[1:])
        young.apply()  # twice: still restores the process's own setting
    finally:
        young.restore()
    assert gc.get_threshold() == before
    young.restore()  # a second restore changes nothing
    assert gc.get_threshold() == before
    with pytest.raises(ValueError):
        YoungThreshold(0)  # gc.set_threshold(0) would turn collection off
