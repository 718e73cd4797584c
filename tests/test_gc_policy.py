"""The GC policy: pauses are measured, and the freezer freezes, refreezes and lets go."""

from __future__ import annotations

import asyncio
import gc

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
    assert [g for g, _ in seen][-2:] == [0, 2]
    assert all(seconds >= 0 for _, seconds in seen)
    count = len(seen)
    gc.collect()
    assert len(seen) == count, "still reporting after uninstall"


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
