"""Placement core: stable hashing, key -> partition, partition -> replica sets, cache homes.

Measured movement (tests below, R = 1, 2 and 3 give the same leadership figures; averages
over N = 3..9, and for leaves over every node of the cluster leaving in turn):

    P    join: leaderships moved (avg P/N_before)   leave: leaderships moved (avg P/N_before)
    16   2.14 (3.04)                                 2.67 (2.67)
    64   9.71 (12.15)                                10.67 (10.67)
    256  39.71 (48.60)                               42.67 (42.67)

A join moves exactly P // N_after leaderships, all to the newcomer; a leave moves exactly
the departed node's leaderships (P // N_before or one more). Replica memberships: a join
adds memberships only for the newcomer; a leave re-adds the departed node's memberships
plus at most 5 chain swaps (P = 256, R = 3), i.e. within 6%.
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.placement import (
    assign,
    home_node,
    home_replicas,
    partition_for,
    rebalance,
    stable_hash,
)

Placement = list[tuple[str, ...]]


def nodes_named(n: int) -> list[str]:
    return [f"node-{i}" for i in range(n)]


def leader_counts(placement: Placement) -> Counter[str]:
    return Counter(replica_set[0] for replica_set in placement)


def membership_counts(placement: Placement) -> Counter[str]:
    return Counter(node for replica_set in placement for node in replica_set)


def leaderships_moved(before: Placement, after: Placement) -> int:
    return sum(old[0] != new[0] for old, new in zip(before, after, strict=True))


def memberships_added(before: Placement, after: Placement) -> Counter[str]:
    added: Counter[str] = Counter()
    for old, new in zip(before, after, strict=True):
        added.update(set(new) - set(old))
    return added


def ceil_of(load_factor: float, numerator: int, denominator: int) -> int:
    return math.ceil(Fraction(repr(float(load_factor))) * numerator / denominator)


def check_invariants(
    placement: Placement, nodes: Sequence[str], replicas: int, load_factor: float = 1.25
) -> None:
    """Everything a placement promises, for any inputs."""
    p, n = len(placement), len(nodes)
    r = min(replicas, n)
    for replica_set in placement:
        assert len(replica_set) == r
        assert len(set(replica_set)) == r, f"replicas not distinct: {replica_set}"
        assert set(replica_set) <= set(nodes)
    leads = leader_counts(placement)
    members = membership_counts(placement)
    lead_cap = ceil_of(load_factor, p, n)
    member_cap = min(p, ceil_of(load_factor, p * r, n))
    for node in nodes:
        assert p // n <= leads[node] <= lead_cap, (node, leads[node], p // n, lead_cap)
        assert p * r // n <= members[node] <= member_cap, (node, members[node], member_cap)


# --- stable_hash ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Pinned: these decide where data lives. If one changes, every cluster reshuffles.
        ("", 16476032584258269876),
        ("a", 4681665781835383343),
        ("orders", 15396940609477705549),
        ("user-42", 8043651368623730598),
        ("ключ", 5536099946253895712),
        (b"orders", 15396940609477705549),
    ],
)
def test_stable_hash_is_pinned(data: bytes | str, expected: int) -> None:
    assert stable_hash(data) == expected


@given(st.text())
def test_stable_hash_of_text_is_hash_of_its_utf8_and_fits_64_bits(text: str) -> None:
    value = stable_hash(text)
    assert value == stable_hash(text.encode("utf-8"))
    assert 0 <= value < 2**64


# --- partition_for --------------------------------------------------------------------


def test_key_partition_is_pinned_and_repeatable() -> None:
    assert [partition_for(k, 16, counter=0) for k in ["a", "b", "user-42", ""]] == [15, 5, 6, 4]
    # The counter only matters for keyless messages.
    assert partition_for("user-42", 16, counter=12345) == 6


def test_random_keys_spread_evenly_over_partitions() -> None:
    rng = random.Random(20240611)
    keys = ["".join(rng.choices(string.ascii_letters + string.digits, k=12)) for _ in range(10_000)]
    counts = Counter(partition_for(key, 16, counter=0) for key in keys)
    assert set(counts) == set(range(16))
    expected = 10_000 / 16  # 625; binomial sigma is about 24, so 15% is about 4 sigma
    for partition, count in counts.items():
        assert abs(count - expected) <= 0.15 * expected, (partition, count)


def test_keyless_messages_round_robin_exactly() -> None:
    assigned = [partition_for(None, 16, counter=c) for c in range(16 * 1000)]
    assert assigned[:17] == [*range(16), 0]
    assert Counter(assigned) == dict.fromkeys(range(16), 1000)


def test_partition_for_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        partition_for("k", 0, counter=0)
    with pytest.raises(ValueError, match="counter must be >= 0"):
        partition_for(None, 4, counter=-1)


# --- assign ---------------------------------------------------------------------------


def test_assign_is_pinned() -> None:
    # Pinned like the hashes: a change here reshuffles every deployed queue.
    assert assign("orders", 8, ["n1", "n2", "n3"], 2) == [
        ("n3", "n2"),
        ("n2", "n3"),
        ("n2", "n1"),
        ("n3", "n2"),
        ("n1", "n3"),
        ("n1", "n3"),
        ("n2", "n1"),
        ("n3", "n1"),
    ]


def test_assign_is_deterministic_and_ignores_node_order() -> None:
    nodes = nodes_named(7)
    first = assign("orders", 64, nodes, 3)
    assert assign("orders", 64, nodes, 3) == first
    assert assign("orders", 64, list(reversed(nodes)), 3) == first
    assert assign("orders", 64, tuple(random.Random(3).sample(nodes, 7)), 3) == first


def test_namespaces_place_independently() -> None:
    nodes = nodes_named(5)
    assert assign("orders", 32, nodes, 2) != assign("payments", 32, nodes, 2)


def test_replicas_are_clamped_to_the_node_count() -> None:
    placement = assign("orders", 10, ["a", "b"], 5)
    assert all(sorted(replica_set) == ["a", "b"] for replica_set in placement)
    assert assign("solo", 3, ["only"], 3) == [("only",)] * 3


@settings(max_examples=150, deadline=None)
@given(
    partitions=st.integers(1, 96),
    node_count=st.integers(1, 12),
    replicas=st.integers(1, 6),
    load_factor=st.sampled_from([1, 1.1, 1.25, 1.5, 2.0, 3.7]),
)
def test_assign_balances_within_the_caps(
    partitions: int, node_count: int, replicas: int, load_factor: float
) -> None:
    nodes = nodes_named(node_count)
    placement = assign("q", partitions, nodes, replicas, load_factor)
    assert len(placement) == partitions
    check_invariants(placement, nodes, replicas, load_factor)
    # Nothing is invalid, so nothing moves.
    assert rebalance(placement, nodes, replicas, load_factor, queue_or_namespace="q") == placement


# --- rebalance ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    partitions=st.integers(1, 64),
    start=st.integers(1, 8),
    replicas=st.integers(1, 4),
    load_factor=st.sampled_from([1, 1.25, 2.0]),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 99)), max_size=6),
)
def test_rebalance_keeps_invariants_through_joins_and_leaves(
    partitions: int,
    start: int,
    replicas: int,
    load_factor: float,
    steps: list[tuple[bool, int]],
) -> None:
    nodes = nodes_named(start)
    fresh = iter(f"late-{i}" for i in range(len(steps)))
    placement = assign("q", partitions, nodes, replicas, load_factor)
    for join, pick in steps:
        if join or len(nodes) == 1:
            nodes = [*nodes, next(fresh)]
        else:
            gone = nodes[pick % len(nodes)]
            nodes = [node for node in nodes if node != gone]
        after = rebalance(placement, nodes, replicas, load_factor, queue_or_namespace="q")
        check_invariants(after, nodes, replicas, load_factor)
        assert rebalance(after, nodes, replicas, load_factor, queue_or_namespace="q") == after
        placement = after


@settings(max_examples=60, deadline=None)
@given(
    previous=st.lists(
        st.lists(st.sampled_from(nodes_named(10)), max_size=5, unique=True).map(tuple),
        min_size=1,
        max_size=40,
    ),
    live=st.lists(st.sampled_from(nodes_named(10)), min_size=1, max_size=10, unique=True),
    replicas=st.integers(1, 5),
)
def test_rebalance_repairs_any_previous_placement(
    previous: Placement, live: list[str], replicas: int
) -> None:
    # Hand-edited, half-placed or produced by an older version: still a valid result.
    after = rebalance(previous, live, replicas, queue_or_namespace="q")
    check_invariants(after, live, replicas)


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("partitions", [16, 64, 256])
def test_a_join_moves_about_p_over_n_leaderships_all_to_the_newcomer(
    partitions: int, replicas: int
) -> None:
    """Measured: exactly P // N_after leaderships move (see the module docstring)."""
    for n in range(3, 10):
        nodes = nodes_named(n)
        before = assign("orders", partitions, nodes, replicas)
        grown = [*nodes, "node-new"]
        after = rebalance(before, grown, replicas, queue_or_namespace="orders")
        check_invariants(after, grown, replicas)

        moved = leaderships_moved(before, after)
        assert moved <= math.ceil(1.5 * partitions / n) + 1
        assert moved == partitions // (n + 1)
        assert leader_counts(after)["node-new"] == moved

        # Replica sets change minimally: only the newcomer is added anywhere, and only
        # up to its fair share of memberships.
        added = memberships_added(before, after)
        r = min(replicas, n + 1)
        assert set(added) <= {"node-new"}
        assert added["node-new"] == membership_counts(after)["node-new"]
        assert added["node-new"] <= -(-partitions * r // (n + 1))


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("partitions", [16, 64, 256])
def test_a_leave_moves_only_the_leavers_partitions(partitions: int, replicas: int) -> None:
    """Measured: the leaver's leaderships (P // N or one more) and nothing else."""
    for n in range(3, 10):
        nodes = nodes_named(n)
        before = assign("orders", partitions, nodes, replicas)
        for gone in nodes:
            remaining = [node for node in nodes if node != gone]
            after = rebalance(before, remaining, replicas, queue_or_namespace="orders")
            check_invariants(after, remaining, replicas)
            assert all(gone not in replica_set for replica_set in after)

            moved = leaderships_moved(before, after)
            assert moved <= math.ceil(1.5 * partitions / n) + 1
            assert moved == leader_counts(before)[gone]
            # A surviving leader keeps every partition it led.
            for old, new in zip(before, after, strict=True):
                if old[0] != gone:
                    assert new[0] == old[0]

            # Replica sets: the leaver's memberships are replaced (unless the sets shrink
            # because fewer nodes than replicas are left), plus a few swaps that keep every
            # node at its floor.
            held = membership_counts(before)[gone]
            must_replace = held if replicas < n else 0
            added = sum(memberships_added(before, after).values())
            assert must_replace <= added <= must_replace + max(replicas, held // 10)


def test_orphaned_leaderships_go_to_surviving_replicas() -> None:
    nodes = nodes_named(6)
    before = assign("orders", 60, nodes, 3)
    after = rebalance(before, nodes[1:], 3, queue_or_namespace="orders")
    orphaned = [p for p, replica_set in enumerate(before) if replica_set[0] == "node-0"]
    assert orphaned
    promoted = sum(after[p][0] in before[p] for p in orphaned)
    # Nearly all: only when every surviving replica already has its share does a
    # partition go to a node without the data.
    assert promoted >= len(orphaned) * 0.8


def test_a_demoted_leader_stays_in_the_set_right_behind_its_successor() -> None:
    nodes = nodes_named(4)
    before = assign("orders", 64, nodes, 3)
    after = rebalance(before, [*nodes, "node-new"], 3, queue_or_namespace="orders")
    for old, new in zip(before, after, strict=True):
        if new[0] != old[0]:
            assert new[0] == "node-new"
            assert new[1] == old[0]


def test_changing_the_replica_count_keeps_the_leaders() -> None:
    nodes = nodes_named(5)
    before = assign("orders", 40, nodes, 2)
    grown = rebalance(before, nodes, 3, queue_or_namespace="orders")
    check_invariants(grown, nodes, 3)
    assert [s[0] for s in grown] == [s[0] for s in before]
    shrunk = rebalance(grown, nodes, 1, queue_or_namespace="orders")
    check_invariants(shrunk, nodes, 1)
    assert [s[0] for s in shrunk] == [s[0] for s in before]


def test_rebalance_sheds_leaders_above_a_tighter_cap() -> None:
    # Everything on one node: the others must take all but the cap.
    previous: Placement = [("a", "b")] * 12
    after = rebalance(previous, ["a", "b", "c"], 2, queue_or_namespace="q")
    check_invariants(after, ["a", "b", "c"], 2)
    assert leader_counts(after) == {"a": 4, "b": 4, "c": 4}


# --- cache homes ----------------------------------------------------------------------


def test_home_node_is_pinned_and_a_prefix_of_home_replicas() -> None:
    nodes = ["n1", "n2", "n3", "n4"]
    assert home_replicas("session:42", nodes, 3) == ("n4", "n3", "n2")
    assert home_node("session:42", nodes) == "n4"
    for r in range(1, 6):
        assert home_replicas("session:42", nodes, r) == home_replicas("session:42", nodes, 4)[:r]
    assert home_node("session:42", list(reversed(nodes))) == "n4"


def test_removing_a_node_moves_only_the_keys_it_was_home_for() -> None:
    nodes = nodes_named(6)
    keys = [f"key-{i}" for i in range(3000)]
    before = {key: home_node(key, nodes) for key in keys}
    counts = Counter(before.values())
    assert all(abs(count - 500) <= 100 for count in counts.values()), counts
    for gone in nodes:
        remaining = [node for node in nodes if node != gone]
        for key in keys:
            after = home_node(key, remaining)
            if before[key] != gone:
                assert after == before[key]


def test_adding_a_node_moves_keys_only_to_it() -> None:
    nodes = nodes_named(5)
    keys = [f"key-{i}" for i in range(3000)]
    moved = 0
    for key in keys:
        before, after = home_node(key, nodes), home_node(key, [*nodes, "node-new"])
        if before != after:
            assert after == "node-new"
            moved += 1
    assert abs(moved - 3000 / 6) <= 100


@given(key=st.text(), node_count=st.integers(1, 8), r=st.integers(1, 10))
def test_home_replicas_are_distinct_live_nodes(key: str, node_count: int, r: int) -> None:
    nodes = nodes_named(node_count)
    homes = home_replicas(key, nodes, r)
    assert len(homes) == min(r, node_count)
    assert len(set(homes)) == len(homes)
    assert set(homes) <= set(nodes)


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: assign("q", 4, [], 1), "no nodes"),
        (lambda: assign("q", 0, ["a"], 1), "partitions must be >= 1"),
        (lambda: assign("q", 4, ["a"], 0), "replicas must be >= 1"),
        (lambda: assign("q", 4, ["a", "b", "a"], 1), "duplicate node ids: a"),
        (lambda: assign("q", 4, ["a", ""], 1), "non-empty strings"),
        (lambda: assign("q", 4, "abc", 1), "not a single string"),
        (lambda: assign("q", 4, ["a"], 1, 0.9), "load_factor must be a finite number >= 1"),
        (lambda: assign("q", 4, ["a"], 1, float("inf")), "load_factor"),
        (lambda: rebalance([], ["a"], 1, queue_or_namespace="q"), "use assign"),
        (lambda: rebalance([("a", "a")], ["a"], 1, queue_or_namespace="q"), "repeats a node"),
        (lambda: rebalance([("a",)], [], 1, queue_or_namespace="q"), "no nodes"),
        (lambda: rebalance([("a",)], ["a"], 0, queue_or_namespace="q"), "replicas must be"),
        (lambda: home_node("k", []), "no nodes"),
        (lambda: home_node("k", ["x", "x"]), "duplicate node ids: x"),
        (lambda: home_replicas("k", ["x"], 0), "r must be >= 1"),
    ],
)
def test_bad_input_is_a_clear_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
