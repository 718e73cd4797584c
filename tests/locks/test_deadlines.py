"""The deadline heap: the first k due entries, in order, without walking the rest."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.locks.deadlines import DeadlineHeap, Key

keys = st.tuples(st.sampled_from("ABCD"), st.sampled_from("xyz"), st.integers(0, 5))
entries = st.lists(st.tuples(st.integers(0, 50), keys), max_size=80)


def reference(
    pushed: list[tuple[int, Key]], live: set[tuple[int, Key]], now: int, limit: int | None
) -> list[tuple[int, Key]]:
    due = sorted({e for e in pushed if e in live and e[0] <= now})
    return due if limit is None else due[:limit]


@settings(max_examples=300)
@given(
    pushed=entries,
    dead=st.sets(st.integers(0, 79)),
    now=st.integers(-1, 55),
    limit=st.one_of(st.none(), st.integers(0, 30)),
)
def test_due_is_the_earliest_live_entries_in_order_once_each(
    pushed: list[tuple[int, Key]], dead: set[int], now: int, limit: int | None
) -> None:
    heap = DeadlineHeap()
    for entry in pushed:
        heap.push(*entry)
    live = {e for i, e in enumerate(pushed) if i not in dead}
    got = heap.due(now, lambda d, k: (d, k) in live, limit)
    assert got == reference(pushed, live, now, limit)
    # Asking does not consume: the same question has the same answer.
    assert heap.due(now, lambda d, k: (d, k) in live, limit) == got


def test_the_first_few_of_a_mass_expiry_cost_a_few_steps() -> None:
    """60,000 leases ending at once: the leader's scan (every 50 ms) asks for 256 and used
    to collect and sort all 60,000 each time."""
    heap = DeadlineHeap()
    for i in range(60_000):
        heap.push(1_000 + i % 7, (f"L{i}", "o", i))
    looked = 0

    def is_live(deadline: int, key: Key) -> bool:
        nonlocal looked
        looked += 1
        return True

    first = heap.due(2_000, is_live, 256)
    assert len(first) == 256 and first == sorted(first)
    assert first[0][0] == 1_000
    assert looked < 3 * 256, f"looked at {looked} entries for 256"
    assert len(heap.due(2_000, lambda d, k: True)) == 60_000, "no limit: all of them"
