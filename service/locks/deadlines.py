"""A lazily cleaned min-heap of deadlines, so the leader's expiry scan is cheap.

The leader asks "which leases are past due?" on every tick. Scanning every lock each
time is O(locks); this heap answers with the first k in O(k log k + stale entries on
top). Entries are never updated in place: a keepalive pushes a new entry and the old one
becomes stale; the caller's `is_live` predicate tells live from stale. The heap is
derived state: it is rebuilt on load and on a leader change, never materialised.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

# (lock name, owner, token or waiter seq): identifies one hold or one wait, and breaks
# ties between equal deadlines in a deterministic order.
Key = tuple[str, str, int]

# Rebuild when stale entries outnumber live ones by this factor (plus a floor, so a
# small table does not rebuild on every keepalive).
_STALE_FACTOR = 2
_REBUILD_FLOOR = 1024


class DeadlineHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[int, Key]] = []
        self._size_after_rebuild = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, deadline_ms: int, key: Key) -> None:
        heapq.heappush(self._heap, (deadline_ms, key))

    def rebuild(self, live: Iterable[tuple[int, Key]]) -> None:
        self._heap = list(live)
        heapq.heapify(self._heap)
        self._size_after_rebuild = len(self._heap)

    def needs_rebuild(self) -> bool:
        return len(self._heap) > _STALE_FACTOR * self._size_after_rebuild + _REBUILD_FLOOR

    def due(
        self, now_ms: int, is_live: Callable[[int, Key], bool], limit: int | None = None
    ) -> list[tuple[int, Key]]:
        """Live entries with deadline <= now_ms, earliest first (ties by key); only the
        first `limit` of them when given.

        Does not remove live entries: the leader proposes an expiry command and the
        entry disappears only when that command is applied.

        The heap is walked best-first from its root, so the entries come out in order
        and the walk stops after `limit`: with 60,000 leases ending at once, the
        leader's scan every 50 ms used to collect and sort all of them to propose 256.
        """
        heap = self._heap
        # Stale entries at the top are garbage: dropping them keeps the walk short.
        while heap and not is_live(*heap[0]):
            heapq.heappop(heap)
        found: list[tuple[int, Key]] = []
        # Entries whose parent was taken; children are never earlier than their parent.
        frontier = [(heap[0], 0)] if heap and heap[0][0] <= now_ms else []
        while frontier and (limit is None or len(found) < limit):
            entry, i = heapq.heappop(frontier)
            # A deadline can be pushed twice for the same key (a keepalive that lands
            # on the same instant); both copies are live and come out one after the
            # other: report it once.
            if is_live(*entry) and (not found or found[-1] != entry):
                found.append(entry)
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap) and heap[child][0] <= now_ms:
                    heapq.heappush(frontier, (heap[child], child))
        return found
