"""Which valid line to evict when a node's cache is over capacity: LRU or LFU.

A policy only orders keys; `LineCache` decides what eviction means for each state
(write-back for M, a notice for E/S). The key the current step is using is spared while
any other key can go, so LFU does not throw out a line the moment it arrives (its count
being the lowest). Both policies are deterministic: they count accesses with a logical
counter, never a clock, and break ties by recency, so the same event sequence always
evicts the same keys (which the seeded simulations rely on).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Literal, Protocol

PolicyName = Literal["lru", "lfu"]


class EvictionPolicy(Protocol):
    def touch(self, key: str) -> None:
        """Record a use of `key` (adding it if it is new)."""

    def discard(self, key: str) -> None:
        """Forget `key` (it was evicted or invalidated)."""

    def victim(self, spare: str | None = None) -> str | None:
        """The key to evict next (never `spare` while another key is tracked), without
        removing it; None if no key is tracked."""


class LruPolicy:
    """Least recently used: an ordered dict, oldest use first; O(1) per operation."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def touch(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def discard(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self, spare: str | None = None) -> str | None:
        first = None
        for key in self._order:
            if key != spare:
                return key
            first = key
        return first


class LfuPolicy:
    """Least frequently used, least recently used among equals.

    A min-heap of (uses, last use, key) with lazy deletion: an entry is current only if
    it equals `_score[key]`; stale entries are skipped and, when they outnumber the live
    ones, compacted away.
    """

    def __init__(self) -> None:
        self._score: dict[str, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._clock = 0

    def touch(self, key: str) -> None:
        self._clock += 1
        uses = self._score.get(key, (0, 0))[0] + 1
        self._score[key] = (uses, self._clock)
        heapq.heappush(self._heap, (uses, self._clock, key))
        if len(self._heap) > 2 * len(self._score) + 64:
            self._heap = [(u, t, k) for k, (u, t) in self._score.items()]
            heapq.heapify(self._heap)

    def discard(self, key: str) -> None:
        self._score.pop(key, None)

    def victim(self, spare: str | None = None) -> str | None:
        top = self._top()
        if top is None or top[2] != spare:
            return None if top is None else top[2]
        heapq.heappop(self._heap)  # look past `spare`, then put it back
        second = self._top()
        heapq.heappush(self._heap, top)
        return spare if second is None else second[2]

    def _top(self) -> tuple[int, int, str] | None:
        while self._heap:
            uses, last, key = self._heap[0]
            if self._score.get(key) == (uses, last):
                return self._heap[0]
            heapq.heappop(self._heap)
        return None


def make_policy(name: PolicyName) -> EvictionPolicy:
    if name == "lru":
        return LruPolicy()
    if name == "lfu":
        return LfuPolicy()
    raise ValueError(f"unknown eviction policy {name!r}: use 'lru' or 'lfu'")
