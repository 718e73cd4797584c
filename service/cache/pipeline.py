"""Carries out the cores' actions in the order they require, per key, with group commit.

Every core step returns its actions as: persists, then sends, then replies; a persist
must be durable before anything after it goes out. Those dependencies are per key: a
step's actions all concern the keys it touched, and the cores keep no state across keys
that a message could reveal. So each step's actions form a *unit*, and a unit waits only
for the units before it that share a key:

- units whose keys are all free go now: their persists together in one Redis MULTI
  (group commit), their sends and replies right after it; units with nothing to persist
  and no key in common with that batch go at once, without touching Redis;
- a unit sharing a key with an earlier waiting or in-flight unit waits its turn, so the
  writes to one key reach Redis in order and nothing about a key overtakes its persist;
- several batches on disjoint keys may be in flight at once (`max_batches`), so one
  slow fsync does not hold up every other key.

Why not one MULTI at a time for everything: with `appendfsync always` on a busy disk a
MULTI takes milliseconds to tens of milliseconds, and a global queue made every miss and
write wait for other keys' fsyncs.

`busy(key)` tells the read-hit fast path whether anything about a key is still on its way
(then the read is fed as a unit of its own and answered in order).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.cache.messages import Action, PersistEntry, PersistLine, Send
from service.cache.store import Persist

log = logging.getLogger("dsync.cache")

PersistFn = Callable[[list[Persist]], Awaitable[None]]
DispatchFn = Callable[[Action], None]


@dataclass(slots=True)
class _Unit:
    actions: list[Action]
    persists: list[Persist]
    keys: frozenset[str]


def _key_of(action: Action) -> str:
    return action.message.key if isinstance(action, Send) else action.key


class Pipeline:
    def __init__(self, persist: PersistFn, dispatch: DispatchFn, *, max_batches: int = 2) -> None:
        self._persist_fn = persist
        self._dispatch_fn = dispatch
        self.max_batches = max_batches
        self._new: deque[_Unit] = deque()  # fed, not looked at yet
        self._waiting: deque[_Unit] = deque()  # looked at: wait for an earlier unit
        self._waiting_keys: dict[str, int] = {}
        self._busy: dict[str, int] = {}  # key -> units not yet dispatched
        self._inflight: dict[str, int] = {}  # key -> batches persisting it now
        self._batches = 0
        self._rescan = False  # a batch finished: what waited may go now
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.persist_batches = 0  # MULTIs done
        self.persisted = 0  # hash writes in them

    def busy(self, key: str) -> bool:
        return key in self._busy

    def feed(self, actions: list[Action]) -> None:
        if not actions:
            return
        persists: list[Persist] = [a for a in actions if isinstance(a, PersistLine | PersistEntry)]
        unit = _Unit(actions, persists, frozenset(_key_of(a) for a in actions))
        for key in unit.keys:
            self._busy[key] = self._busy.get(key, 0) + 1
        self._new.append(unit)
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in list(self._tasks):
            task.cancel()

    async def run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._rescan:
                self._rescan = False
                self._waiting.extend(self._new)
                self._new, self._waiting = self._waiting, deque()
                self._waiting_keys.clear()
            self._schedule()

    def _schedule(self) -> None:
        """Look at the new units in order: each goes now, joins the batch being formed,
        or waits behind an earlier unit with a key in common. Cost: O(new units)."""
        batch: list[_Unit] = []
        batch_keys: set[str] = set()
        while self._new:
            unit = self._new.popleft()
            keys = unit.keys
            if any(k in self._waiting_keys or k in self._inflight for k in keys) or (
                unit.persists and self._batches >= self.max_batches
            ):
                self._waiting.append(unit)
                for key in keys:
                    self._waiting_keys[key] = self._waiting_keys.get(key, 0) + 1
            elif unit.persists or not keys.isdisjoint(batch_keys):
                batch.append(unit)
                batch_keys |= keys
            else:
                self._dispatch(unit)  # may feed more units (deliveries to self)
        if batch:
            self._launch(batch, batch_keys)

    def _launch(self, batch: list[_Unit], keys: set[str]) -> None:
        self._batches += 1
        for key in keys:
            self._inflight[key] = self._inflight.get(key, 0) + 1
        task = asyncio.ensure_future(self._run_batch(batch, keys))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[_Unit], keys: set[str]) -> None:
        persists = [p for unit in batch for p in unit.persists]
        try:
            if persists:
                await self._persist(persists)
        finally:
            self._batches -= 1
            for key in keys:
                left = self._inflight[key] - 1
                if left:
                    self._inflight[key] = left
                else:
                    del self._inflight[key]
        for unit in batch:
            self._dispatch(unit)
        self._rescan = True
        self._wake.set()

    async def _persist(self, persists: list[Persist]) -> None:
        backoff = 0.01
        while True:
            try:
                await self._persist_fn(persists)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    raise
                log.warning(
                    "cache persist failed; retrying",
                    extra={"writes": len(persists), "error": repr(exc)},
                )
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
        self.persist_batches += 1
        self.persisted += len(persists)

    def _dispatch(self, unit: _Unit) -> None:
        for key in unit.keys:
            left = self._busy[key] - 1
            if left:
                self._busy[key] = left
            else:
                del self._busy[key]
        for action in unit.actions:
            if isinstance(action, PersistLine | PersistEntry):
                continue
            try:
                self._dispatch_fn(action)
            except Exception:
                log.exception("cache action failed", extra={"action": repr(action)[:200]})


__all__ = ["Pipeline"]
