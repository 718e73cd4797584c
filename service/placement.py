"""Deterministic placement: message keys to partitions, partitions and cache keys to nodes.

Pure functions shared by the queue and the cache services: no I/O, no clocks, no global
random. Every node computes the same answer from the same inputs, so a placement can be
recomputed anywhere and only its result (and epoch) needs to go through the Raft log.

Why rendezvous (HRW) hashing rather than a vnode ring: every (item, node) pair gets an
independent pseudo-random weight and an item prefers nodes in descending weight order.
That gives a full preference *list* per item for free (the ordered replica set), needs no
ring tables or vnode tuning, and has the minimal-disruption property by construction:
removing a node only moves the items that ranked it first, adding one only moves items
to the newcomer. With the node counts we run (a handful to a few dozen) computing
P x N weights is cheap.

Why a bounded-load cap on top: plain HRW balances only on average; with few partitions
per node it is lumpy (16 partitions on 5 nodes, fair share 3.2: the busiest node leads
5.4 on average and 7 or more for one queue in seven). So partition placement caps each
node at ``ceil(c * P / N)`` leaderships (``c`` = ``load_factor``, 1.25 by default) and
at ``ceil(c * P * R / N)`` replica memberships (leader slots included), as in
"consistent hashing with bounded loads" (Mirrokni, Thorup, Zadimoghaddam). The cap
alone would let a newly joined node sit idle (nobody is *over* the cap, so nothing has
to move), so placement also keeps every node at or above a floor of ``P // N``
leaderships and ``P * R // N`` memberships; that floor is what makes a join hand the
newcomer its share, and nothing more.

Cache homes (``home_node``/``home_replicas``) use plain HRW without the cap: keys are many
and small, and a bounded-load placement needs to know every other key, which a stateless
per-key lookup cannot.

Movement (see ``rebalance``): starting from a placement this module produced, a join of
one node moves exactly ``P // N_after`` leaderships (all to the newcomer) in practice,
and a leave moves exactly the leaderships the departed node held (at most
``ceil(c * P / N_before)``, in practice ``P // N_before`` or one more). Replica
memberships behave the same way: a join adds about ``P * R / N_after`` memberships, all
on the newcomer; a leave replaces the departed node's memberships plus a few swaps that
keep every node at its floor (at most 5 for P = 256, R = 3).

Cost: a rebalance is O(P * N) for the common path and O(P^2 * R / N) for the floor
steals of a join; about 15 ms for P = 256, N = 9, R = 3 and 1 s for P = 4096, N = 32.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, deque
from collections.abc import Sequence
from fractions import Fraction

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "assign",
    "home_node",
    "home_replicas",
    "partition_for",
    "rebalance",
    "stable_hash",
]

DEFAULT_LOAD_FACTOR = 1.25

Placement = list[tuple[str, ...]]


def stable_hash(data: bytes | str) -> int:
    """A 64-bit hash that is the same in every process and every Python version.

    Python's ``hash()`` is salted per process (PYTHONHASHSEED), so it cannot decide where
    data lives. BLAKE2b is in hashlib everywhere, fast, and well mixed in every bit, so
    the modulo and the max-weight comparisons below see no bias. Strings hash as UTF-8.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


def partition_for(key: str | None, partitions: int, *, counter: int) -> int:
    """The partition of a message: by stable hash of its key, else round-robin.

    Messages with the same key always land in the same partition (so they keep their
    order). Keyless messages have no order to keep, so they spread exactly evenly:
    ``counter % partitions``, where the caller supplies a counter it advances per keyless
    message (a per-queue sequence number), which keeps this function pure. The empty
    string is a key like any other; only ``None`` means "no key".
    """
    _check_positive("partitions", partitions)
    if key is None:
        if counter < 0:
            raise ValueError(f"counter must be >= 0, got {counter}")
        return counter % partitions
    # 2**64 is so much larger than any partition count that modulo bias is negligible.
    return stable_hash(key) % partitions


def home_node(key: str, nodes: Sequence[str]) -> str:
    """The cache home of ``key``: the live node with the highest HRW weight for it.

    Removing a node re-homes only the keys it was home for; adding one takes only the
    keys for which the newcomer now has the highest weight. Ties (astronomically rare
    64-bit collisions) go to the smaller node id.
    """
    return home_replicas(key, nodes, 1)[0]


def home_replicas(key: str, nodes: Sequence[str], r: int) -> tuple[str, ...]:
    """The ``min(r, len(nodes))`` highest-weight nodes for ``key``, home first.

    A prefix of the same list for every ``r``, so ``home_replicas(k, n, r)[0] ==
    home_node(k, n)`` and growing ``r`` never reshuffles the earlier entries.
    """
    live = _check_nodes(nodes)
    _check_positive("r", r)
    scope = _key_scope(key)
    ranked = sorted(live, key=lambda node: (-_weight(scope, node), node))
    return tuple(ranked[: min(r, len(live))])


def assign(
    queue_or_namespace: str,
    partitions: int,
    nodes: Sequence[str],
    replicas: int,
    load_factor: float = DEFAULT_LOAD_FACTOR,
) -> Placement:
    """Place ``partitions`` partitions of a queue (or namespace) on ``nodes`` from scratch.

    Returns one tuple per partition (index = partition): ``min(replicas, len(nodes))``
    distinct node ids, the first being the preferred leader. Each node leads between
    ``partitions // N`` and ``ceil(load_factor * partitions / N)`` partitions and belongs
    to between ``partitions * R // N`` and ``ceil(load_factor * partitions * R / N)``
    replica sets (both capped at ``partitions``). The namespace seeds the weights, so
    different queues spread their leaders differently. The order of ``nodes`` does not
    matter.

    This is ``rebalance`` from an empty placement, so ``rebalance(assign(...))`` with the
    same nodes returns the same placement.
    """
    _check_positive("partitions", partitions)
    empty: list[tuple[str, ...]] = [()] * partitions
    return _place(queue_or_namespace, empty, nodes, replicas, load_factor)


def rebalance(
    previous: Sequence[tuple[str, ...]],
    nodes: Sequence[str],
    replicas: int,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    *,
    queue_or_namespace: str,
) -> Placement:
    """Adapt ``previous`` to a new live node set (or replica count), moving only what must.

    A leadership stays where it is while its node is alive and within the cap; a replica
    stays while its node is alive, within the cap, and the set is not longer than
    ``replicas``. What must change, changes:

    * a departed node's leaderships go first to nodes below the floor, preferring a
      surviving replica of that partition (it already has the data), then by HRW weight;
    * a node above the cap (the cap shrinks as nodes join) sheds its lowest-weight extras;
    * a node below the floor (typically the newcomer) takes leaderships from the
      most-loaded nodes, preferring partitions it already replicates; the old leader
      stays in the set, right behind the new one, so it can hand over its data;
    * memberships follow the same rules, and a set that lost a node is refilled.

    Bound achieved (leaderships, from a placement this module produced, which keeps every
    node within [P // N, ceil(P / N)] leaderships): a join moves
    ``max(P // N_after, shed)`` leaderships, where ``shed`` is nonzero only for
    N_before < 4 and is itself at most ``P // N_after``, so exactly ``P // N_after``; a
    leave moves the departed node's leaderships, ``<= P // N_before + 1`` (measured
    figures are in tests/placement/test_placement.py). Nothing moves for a rebalance with
    the same nodes.

    ``previous`` may contain dead nodes and empty tuples (unplaced partitions); its length
    is the partition count.
    """
    if isinstance(previous, str | bytes):
        raise ValueError("previous must be a sequence of replica tuples, not a string")
    prior = [tuple(replica_set) for replica_set in previous]
    if not prior:
        raise ValueError("previous placement has no partitions; use assign() to place from scratch")
    for partition, replica_set in enumerate(prior):
        if len(set(replica_set)) != len(replica_set):
            raise ValueError(
                f"previous placement of partition {partition} repeats a node: {replica_set!r}"
            )
        for node in replica_set:
            if not isinstance(node, str):
                raise ValueError(
                    f"previous placement of partition {partition} has a non-string node id {node!r}"
                )
    return _place(queue_or_namespace, prior, nodes, replicas, load_factor)


# --- validation ---------------------------------------------------------------------


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_nodes(nodes: Sequence[str]) -> tuple[str, ...]:
    """Sorted live node ids; sorting makes every result independent of the input order."""
    if isinstance(nodes, str | bytes):
        raise ValueError("nodes must be a sequence of node ids, not a single string")
    live = tuple(nodes)
    if not live:
        raise ValueError("no nodes: placement needs at least one live node")
    for node in live:
        if not isinstance(node, str) or not node:
            raise ValueError(f"node ids must be non-empty strings, got {node!r}")
    if len(set(live)) != len(live):
        duplicates = sorted(node for node, times in Counter(live).items() if times > 1)
        raise ValueError(f"duplicate node ids: {', '.join(duplicates)}")
    return tuple(sorted(live))


def _check_load_factor(load_factor: float) -> Fraction:
    if isinstance(load_factor, bool) or not isinstance(load_factor, int | float):
        raise ValueError(f"load_factor must be a number, got {load_factor!r}")
    if not math.isfinite(load_factor) or load_factor < 1:
        # Below 1 the caps cannot hold every partition; infinity would disable them.
        raise ValueError(f"load_factor must be a finite number >= 1, got {load_factor!r}")
    # Exact arithmetic through the decimal repr: 1.1 means 11/10, so ceil(1.1 * 10 / 11)
    # is 1 and not 2 as the binary float 1.1000000000000000888 would make it.
    return Fraction(repr(float(load_factor)))


# --- weights ------------------------------------------------------------------------


def _partition_scope(namespace: str, partition: int) -> str:
    # Distinct prefixes keep partition weights independent of cache-key weights. The
    # partition number follows the last '#' (digits contain none), so the scope splits back
    # into exactly one (namespace, partition) pair: no two pairs share weights.
    return f"partition:{namespace}#{partition}"


def _key_scope(key: str) -> str:
    return f"key:{key}"


def _weight(scope: str, node: str) -> int:
    # Length-prefixing the scope makes the encoding injective: ("ab", "c") and ("a", "bc")
    # hash different strings.
    return stable_hash(f"{len(scope)}:{scope}{node}")


# --- partition placement ------------------------------------------------------------


def _place(
    namespace: str,
    previous: list[tuple[str, ...]],
    nodes: Sequence[str],
    replicas: int,
    load_factor: float,
) -> Placement:
    live = _check_nodes(nodes)
    _check_positive("replicas", replicas)
    factor = _check_load_factor(load_factor)
    partitions = len(previous)
    n = len(live)
    r = min(replicas, n)
    weights = [
        {node: _weight(_partition_scope(namespace, p), node) for node in live}
        for p in range(partitions)
    ]
    leaders = _place_leaders(
        previous,
        live,
        weights,
        cap=math.ceil(factor * partitions / n),
        floor=partitions // n,
    )
    alive = set(live)
    sets: list[list[str]] = []
    for p, leader in enumerate(leaders):
        # Survivors keep their relative order; a demoted leader is thus first in line
        # behind its successor, which is where a leadership handover wants it.
        kept = [node for node in previous[p] if node in alive and node != leader]
        sets.append([leader, *kept])
    _place_followers(
        sets,
        live,
        weights,
        r,
        cap=min(partitions, math.ceil(factor * partitions * r / n)),
        floor=partitions * r // n,
    )
    return [tuple(replica_set) for replica_set in sets]


def _place_leaders(
    previous: list[tuple[str, ...]],
    live: tuple[str, ...],
    weights: list[dict[str, int]],
    *,
    cap: int,
    floor: int,
) -> list[str]:
    partitions = len(previous)
    alive = set(live)
    count = dict.fromkeys(live, 0)
    leader: list[str | None] = [None] * partitions

    for p, replica_set in enumerate(previous):
        if replica_set and replica_set[0] in alive:
            leader[p] = replica_set[0]
            count[replica_set[0]] += 1

    # Over the cap (it shrinks when nodes join): shed the partitions this node ranks
    # lowest for, i.e. those HRW would least have given it.
    for node in live:
        excess = count[node] - cap
        if excess > 0:
            led = sorted((weights[p][node], p) for p in range(partitions) if leader[p] == node)
            for _, p in led[:excess]:
                leader[p] = None
                count[node] -= 1

    # Orphans. Nodes below the floor come first: giving them the orphan now saves a second
    # move later; then nodes below the even share ceil(P / N), so that loads stay within
    # [floor, floor + 1] and the next join or leave finds nothing above its new floor to
    # move. Then a surviving replica (it has the data), then HRW weight, then id. From
    # scratch this is plain HRW with every node capped at the floor until all reach it.
    # Some node is always under the cap, because cap * N >= P.
    share = -(-partitions // len(live))
    for p in range(partitions):
        if leader[p] is None:
            prior = previous[p]
            _, _, _, _, _, chosen = min(
                (
                    count[node] >= floor,
                    count[node] >= share,
                    node not in prior,
                    prior.index(node) if node in prior else 0,
                    -weights[p][node],
                    node,
                )
                for node in live
                if count[node] < cap
            )
            leader[p] = chosen
            count[chosen] += 1

    placed = [node for node in leader if node is not None]
    assert len(placed) == partitions  # every orphan was placed just above

    # Floor: a node below it (a newcomer) takes leaderships from the most-loaded nodes.
    # Sum of counts is P >= N * floor, so while one node is below the floor another is
    # above it and can give without dropping below; each step lowers the total deficit.
    while True:
        needy = [(count[node], node) for node in live if count[node] < floor]
        if not needy:
            return placed
        _, taker = min(needy)
        _, _, _, q = min(
            (
                taker not in previous[q],  # already a replica: the handover copies nothing
                -count[placed[q]],
                -weights[q][taker],
                q,
            )
            for q in range(partitions)
            if count[placed[q]] > floor
        )
        count[placed[q]] -= 1
        count[taker] += 1
        placed[q] = taker


def _place_followers(
    sets: list[list[str]],
    live: tuple[str, ...],
    weights: list[dict[str, int]],
    r: int,
    *,
    cap: int,
    floor: int,
) -> None:
    """Fill every set to ``r`` distinct nodes with memberships in [floor, cap], in place.

    Sets arrive as leader + surviving members in their old order, possibly longer than
    ``r``. Leaders (index 0) are fixed here; only follower slots move. Feasibility: for any
    leader choice with at most ``cap`` leaderships per node, a max-flow/min-cut argument
    shows the sets can be filled within the cap whenever cap >= P * r / N (which
    load_factor >= 1 guarantees), so when greedy choice runs out of candidates an
    augmenting chain of swaps (``_chain_to_spare``) always exists.
    """
    count = dict.fromkeys(live, 0)
    for replica_set in sets:
        for node in replica_set:
            count[node] += 1

    # Too long (a new leader was put in front, or r shrank): drop the most-loaded
    # followers, which is what the floor would otherwise have to repair with extra swaps.
    # The first follower is kept when r allows: it is the demoted leader, the handover
    # source. Ties drop the later position, the one least in line for leadership.
    for replica_set in sets:
        keep = 2 if r >= 2 else 1
        while len(replica_set) > r:
            _, _, dropped = max(
                (count[node], position, node)
                for position, node in enumerate(replica_set)
                if position >= keep
            )
            replica_set.remove(dropped)
            count[dropped] -= 1

    for node in live:
        excess = count[node] - cap
        if excess > 0:
            held = sorted(
                (weights[p][node], p)
                for p, replica_set in enumerate(sets)
                if node in replica_set[1:]
            )
            for _, p in held[:excess]:
                sets[p].remove(node)
                count[node] -= 1

    # Fill with the same preference order as leaderships: below the floor, below the even
    # share, HRW weight, id.
    share = -(-len(sets) * r // len(live))
    for p, replica_set in enumerate(sets):
        while len(replica_set) < r:
            candidates = [
                (count[node] >= floor, count[node] >= share, -weights[p][node], node)
                for node in live
                if node not in replica_set and count[node] < cap
            ]
            if candidates:
                chosen = min(candidates)[3]
                replica_set.append(chosen)
                count[chosen] += 1
                continue
            chain = _chain_to_spare(p, sets, live, count, cap)
            if chain is None:  # pragma: no cover - excluded by the flow argument above
                raise AssertionError(f"no placement within the cap for partition {p}")
            first, swaps = chain
            for q, old, new in swaps:
                sets[q][sets[q].index(old)] = new
            replica_set.append(first)
            count[swaps[-1][2] if swaps else first] += 1

    # Floor: a node below it takes a follower slot from a node above it. Best effort via
    # augmenting chains; the property tests found no case where it fails.
    while True:
        needy = sorted((count[node], node) for node in live if count[node] < floor)
        progressed = False
        for _, taker in needy:
            taken = _chain_from_surplus(taker, sets, live, weights, count, floor)
            if taken is None:
                continue
            for q, old, new in taken:
                sets[q][sets[q].index(old)] = new
            count[taker] += 1
            count[taken[-1][1]] -= 1
            progressed = True
            break
        if not progressed:
            return


def _chain_to_spare(
    p: int,
    sets: list[list[str]],
    live: tuple[str, ...],
    count: dict[str, int],
    cap: int,
) -> tuple[str, list[tuple[int, str, str]]] | None:
    """Make room for one more member of set ``p`` when every non-member is at the cap.

    Returns (node to add to ``p``, swaps (q, old, new) to apply) where the swaps push a
    slot along a chain ``x0 -> x1 -> ... -> xk``: x0 joins ``p``, x_i gives its follower
    slot in q_i to x_{i+1}, and only xk (below the cap) ends with one more membership.
    BFS over nodes, i.e. an augmenting path in the flow network partitions -> nodes.
    Applying the swaps keeps every set duplicate-free: the chain's nodes are distinct
    and consecutive swaps can't hit the same set (x_i is in q_i, x_i is not in q_{i-1}).
    """
    parent: dict[str, tuple[str, int] | None] = {}
    frontier: deque[str] = deque()
    for node in live:
        if node not in sets[p]:
            parent[node] = None
            frontier.append(node)
    while frontier:
        node = frontier.popleft()
        for q, replica_set in enumerate(sets):
            if node not in replica_set[1:]:
                continue
            for other in live:
                if other in parent or other in replica_set:
                    continue
                parent[other] = (node, q)
                if count[other] < cap:
                    swaps: list[tuple[int, str, str]] = []
                    current = other
                    link = parent[current]
                    while link is not None:
                        previous_node, via = link
                        swaps.append((via, previous_node, current))
                        current = previous_node
                        link = parent[current]
                    swaps.reverse()
                    return current, swaps
                frontier.append(other)
    return None


def _chain_from_surplus(
    taker: str,
    sets: list[list[str]],
    live: tuple[str, ...],
    weights: list[dict[str, int]],
    count: dict[str, int],
    floor: int,
) -> list[tuple[int, str, str]] | None:
    """Swaps (q, old, new) that give ``taker`` one more follower slot, taken (possibly
    through intermediaries whose counts don't change) from a node above the floor.

    Direct takes are tried first, from the most-loaded donor and in the set the taker
    ranks highest for; otherwise BFS finds the shortest chain.
    """
    direct = [
        (-count[donor], -weights[q][taker], q, donor)
        for q, replica_set in enumerate(sets)
        if taker not in replica_set
        for donor in replica_set[1:]
        if count[donor] > floor
    ]
    if direct:
        _, _, q, donor = min(direct)
        return [(q, donor, taker)]
    parent: dict[str, tuple[str, int] | None] = {taker: None}
    frontier: deque[str] = deque([taker])
    while frontier:
        node = frontier.popleft()
        for q, replica_set in enumerate(sets):
            if node in replica_set:
                continue
            for other in replica_set[1:]:
                if other in parent:
                    continue
                parent[other] = (node, q)
                if count[other] > floor:
                    swaps: list[tuple[int, str, str]] = []
                    current = other
                    link = parent[current]
                    while link is not None:
                        newcomer, via = link
                        swaps.append((via, current, newcomer))
                        current = newcomer
                        link = parent[current]
                    return swaps[::-1]
                frontier.append(other)
    return None
