"""Network partitions on real processes: each node in its own network namespace.

Killing a process closes its sockets, and the peers learn at once; a partition does not:
packets just stop, connections hang, and both sides keep running. These tests cut links
with `tests/integration/netlab.py` (root and `ip` needed; skipped otherwise) while clients
keep talking to every node, the partitioned one included:
- locks: the leader is cut off from both followers. The majority elects a leader and
  grants again; the old leader steps down and answers its clients (503, never a grant it
  cannot commit, never a hang); after the heal it rejoins without forcing an election,
  and the history shows no two holders at once.
- queues: a node leading partitions is cut off. Publishing through the others resumes
  (its partitions move to in-sync replicas); every acknowledged publish is delivered
  after the heal, through every node.
- cache: a node is cut off while clients read and write overlapping keys through all
  three. Its shared copies may serve reads until their lease runs out, and nothing it
  cannot confirm with a peer is acknowledged; the history checker finds no stale read
  and no lost write, during the cut and after the heal.
- one link: leader and a follower lose only their link. The leader stays (pre-vote: the
  third node refuses the stranded follower), the term does not move, and writes go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.cluster import LocalCluster, free_base_port, http_json

from . import test_cache_process as cache_run
from . import test_queue_process as queue_run
from .netlab import NetLab, NetLabUnavailable
from .test_locks_process import check_history
from .test_locks_process import start_clients as start_lock_clients
from .test_queue_process import producer as queue_producer

pytestmark = pytest.mark.slow

# Longest a node may take to answer while partitioned: its forwarding gives up on a
# leader after 3 s (LEADER_WAIT_SECONDS), plus slack for a loaded machine.
ANSWER_BOUND_SECONDS = 8.0
# A delivery whose answer is lost on the way (a node forwarding a consume gives up on a
# slow leader after 1 s) stays invisible this long, then is delivered again: short, so
# the drain sees it again well within its deadline (at-least-once, as designed).
DRAIN_VISIBILITY_MS = 3_000
# Longer than anything here: no lease may lapse while its holder retries a release.
LOCK_TTL_MS = 60_000


@pytest.fixture
def lab() -> Iterator[NetLab]:
    try:
        net = NetLab(3)
    except NetLabUnavailable as exc:
        pytest.skip(str(exc))
    with net:
        yield net


@pytest.fixture
def cluster(lab: NetLab, tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(
        size=3,
        base_port=free_base_port(3),
        data_root=tmp_path / "data",
        log_to_files=True,
        extra_env={"LOG_LEVEL": "INFO"},
        hosts=lab.addresses,
        launchers=[lab.launcher(i) for i in range(3)],
    )
    c.start()
    try:
        yield c
    finally:
        lab.heal()
        c.stop(timeout=10)
        c.kill_all()
        for node in c.nodes:
            if node.log_path is not None and node.log_path.exists():
                tail = node.log_path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {node.node_id} log tail ---\n" + "\n".join(tail))


def timed(c: LocalCluster, node: int, method: str, path: str, body: Any,
          timeout: float) -> tuple[int, Any, float]:
    started = time.monotonic()
    try:
        status, reply = http_json(method, c.nodes[node].url + path, body, timeout=timeout)
    except (OSError, ValueError):
        status, reply = 0, {}
    return status, reply, time.monotonic() - started


def wait_converged(c: LocalCluster, timeout: float) -> list[dict[str, Any]]:
    """Every node's health once all agree on term and leader and have applied the same
    index; AssertionError with the last views otherwise."""
    deadline = time.monotonic() + timeout
    views: list[dict[str, Any] | None] = []
    while time.monotonic() < deadline:
        views = [c.health(i, timeout=1.0) for i in range(c.size)]
        if all(views):
            seen = {(v["term"], v["leader"], v["applied_index"]) for v in views if v}
            if len(seen) == 1 and next(iter(seen))[1] is not None:
                return [v for v in views if v]
        time.sleep(0.1)
    raise AssertionError(f"nodes did not converge within {timeout} s: {views}")


def test_a_leader_cut_off_steps_down_and_the_majority_grants_locks(
    lab: NetLab, cluster: LocalCluster
) -> None:
    old = cluster.wait_for_leader(30)
    before = cluster.health(old)
    assert before is not None
    holds, errors, threads = start_lock_clients(cluster, 8, seconds=16, ttl_ms=LOCK_TTL_MS)
    time.sleep(3)
    followers = [i for i in range(3) if i != old]
    in_flight: list[tuple[int, Any, float]] = []

    def acquire_through(node: int, name: str) -> None:
        body = {"owner": "in-flight", "request_id": f"in-flight-{name}"}
        in_flight.append(timed(cluster, node, "POST", f"/v1/locks/{name}", body, 15))

    cut_at = time.monotonic()
    lab.isolate(old)
    # Forwarded just as the leader is cut off, on sockets the load keeps open: they must
    # not wait out their timeout (6 s) but go to the new leader once it is known.
    senders = [threading.Thread(target=acquire_through, args=(node, f"in-flight{node}"))
               for node in followers]
    for t in senders:
        t.start()

    # The majority elects a new leader; the old one notices it lost its quorum.
    new = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        views = [cluster.health(i, timeout=1.0) for i in range(3)]
        majority = [v for i, v in enumerate(views) if i != old and v]
        leaders = {v["leader"] for v in majority}
        if len(majority) == 2 and len(leaders) == 1 and None not in leaders and (
            cluster.nodes[old].node_id not in leaders  # not yet told the old one is gone
        ):
            old_view = views[old]
            if old_view is not None and old_view["role"] != "leader":
                new = next(iter(leaders))
                break
        time.sleep(0.1)
    assert new is not None, f"no new leader, or the old one still leads: {views}"
    assert new != cluster.nodes[old].node_id
    elected_after = time.monotonic() - cut_at
    for t in senders:
        t.join(20)
    print("forwarded at the cut:", [(s, round(t, 2)) for s, _, t in in_flight])
    for status, reply, took in in_flight:
        assert status == 200 and took < 2.5, (status, reply, took)

    # The cut-off node answers its own clients, and never with a grant.
    probes = [
        timed(cluster, old, "POST", f"/v1/locks/probe{i}", {"owner": "cut", "wait_ms": 0},
              timeout=ANSWER_BOUND_SECONDS + 5)
        for i in range(2)
    ]
    print("probes through the cut-off node:", [(s, round(t, 2)) for s, _, t in probes])
    for status, reply, took in probes:
        assert status == 503, (status, reply)
        assert took < ANSWER_BOUND_SECONDS, f"the partitioned node took {took:.1f} s"
    status, reply, took = timed(cluster, old, "GET", "/v1/locks/probe0", None, timeout=15)
    assert status == 503 and took < ANSWER_BOUND_SECONDS, (status, reply, took)
    # The majority serves at full speed meanwhile (the clients above also pay for the
    # time they spend on the cut-off node).
    follower = next(i for i in followers if cluster.nodes[i].node_id != new)
    for i in range(5):
        name = f"/v1/locks/direct{i}"
        status, grant, took = timed(cluster, follower, "POST", name, {"owner": "direct"}, 5)
        assert status == 200 and took < 1.0, (status, grant, took)
        status, reply, took = timed(cluster, follower, "DELETE", name,
                                    {"owner": "direct", "token": grant["token"]}, 5)
        assert status == 200 and took < 1.0, (status, reply, took)

    time.sleep(max(0.0, cut_at + 6.5 - time.monotonic()))
    healed_at = time.monotonic()
    lab.heal()
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    during = [h for h in holds if cut_at + elected_after < h.acked_at < healed_at]
    print(f"{len(holds)} grants; new leader {new} {elected_after:.2f} s after the cut; "
          f"{len(during)} grants while it was cut off")
    assert during, "the majority granted nothing while the old leader was cut off"
    check_history(holds)

    # The old leader rejoins as a follower of the new term without an election of its
    # own (pre-vote), and catches up: every node applies the same log.
    views = wait_converged(cluster, 20)
    assert views[0]["leader"] == new, views
    assert views[old]["role"] == "follower", views
    new_index = next(i for i, n in enumerate(cluster.nodes) if n.node_id == new)
    status, probe, _ = timed(cluster, new_index, "GET", "/v1/locks/probe0", None, timeout=5)
    assert status == 404, (status, probe)  # the refused probes left nothing behind


@pytest.mark.parametrize("raft_role", ["follower", "leader"])
def test_a_partition_leader_cut_off_hands_over_and_nothing_acknowledged_is_lost(
    lab: NetLab, cluster: LocalCluster, raft_role: str
) -> None:
    raft_leader = cluster.wait_for_leader(30)
    status, reply, _ = timed(cluster, 0, "PUT", "/v1/queues/drill", {"partitions": 8},
                             timeout=10)
    assert status == 201, reply
    status, info, _ = timed(cluster, 0, "GET", "/v1/queues/drill", None, timeout=5)
    assert status == 200, info
    # Cut off a node that leads partitions, and Raft too or not: its partitions must
    # move (with the Raft leader, once the others have elected a new one).
    leads = {n.node_id: 0 for n in cluster.nodes}
    for p in info["partitions"]:
        leads[p["owner"]] = leads.get(p["owner"], 0) + 1
    victim = raft_leader if raft_role == "leader" else max(
        (i for i in range(3) if i != raft_leader),
        key=lambda i: leads[cluster.nodes[i].node_id],
    )
    assert leads[cluster.nodes[victim].node_id] > 0, info

    victim_parts = {p["partition"] for p in info["partitions"]
                    if p["owner"] == cluster.nodes[victim].node_id}
    majority = [i for i in range(3) if i != victim]
    key = None
    for n in range(200):
        status, reply, _ = timed(cluster, majority[0], "POST", "/v1/queues/drill/messages",
                                 {"body": "find", "key": f"k{n}", "id": f"find{n}"}, 5)
        assert status == 201, reply
        if reply["partition"] in victim_parts:
            key = f"k{n}"
            break
    assert key is not None, "no key maps to a partition the victim leads"

    acked: dict[str, float] = {f"find{i}": 0.0 for i in range(n + 1)}
    errors: list[str] = []
    guard = threading.Lock()
    stop_at = time.monotonic() + 12
    threads = [
        threading.Thread(target=queue_producer,
                         args=(cluster, i, stop_at, acked, errors, guard))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    time.sleep(2.5)
    cut_at = time.monotonic()
    lab.isolate(victim)
    # How long until a message for one of its partitions is accepted through the others.
    resumed = None
    attempt = 0
    while time.monotonic() < cut_at + 15:
        attempt += 1
        status, reply, _ = timed(cluster, majority[attempt % 2], "POST",
                                 "/v1/queues/drill/messages",
                                 {"body": "resume", "key": key, "id": "resume"}, 3)
        if status == 201:
            resumed = time.monotonic() - cut_at
            acked["resume"] = time.monotonic()
            break
        assert status in (0, 503), (status, reply)
        time.sleep(0.05)
    assert resumed is not None, "a cut-off partition leader's partition never moved"
    # Sent at the cut to a node that forwards it to the cut-off leader: the forward is
    # dropped when the partition moves, not after its 3 s timeout.
    assert resumed < 2.0, f"publishes to its partition resumed only {resumed:.2f} s after"
    time.sleep(max(0.0, cut_at + 6 - time.monotonic()))
    # Publishes through the cut-off node are answered (an error, its partitions being
    # unreachable), not left hanging.
    status, reply, took = timed(cluster, victim, "POST", "/v1/queues/drill/messages",
                                {"body": "from the cut-off side", "id": "cut-probe"},
                                timeout=20)
    assert took < ANSWER_BOUND_SECONDS + 4, f"publish took {took:.1f} s"
    healed_at = time.monotonic()
    lab.heal()
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads), "a producer hung"
    assert not errors, errors[:5]
    during = sorted(t for t in acked.values() if cut_at + 3 < t < healed_at)
    print(f"{len(acked)} publishes acknowledged, {len(during)} from 3 s after the cut "
          f"until the heal; its partition took publishes again {resumed:.2f} s after the "
          f"cut; probe through the cut-off node: {status} in {took:.1f} s")
    assert during, "publishing did not resume while a partition leader was cut off"
    if status == 201:
        acked["cut-probe"] = healed_at

    wait_converged(cluster, 20)
    queue_run.drain(cluster, acked, visibility_ms=DRAIN_VISIBILITY_MS)


def test_a_cache_node_cut_off_serves_nothing_stale_and_loses_no_write(
    lab: NetLab, cluster: LocalCluster
) -> None:
    cluster.wait_for_leader(30)
    cache_run.wait_ready(cluster)
    history = cache_run.History()
    started = time.monotonic()
    stop_at = started + 14
    threads = [
        threading.Thread(target=cache_run.client, args=(cluster, i, stop_at, history),
                         daemon=True)
        for i in range(cache_run.CLIENTS)
    ]
    for t in threads:
        t.start()
    victim = 1
    cut_off = cluster.nodes[victim].node_id
    time.sleep(3)

    def home_of(key: str) -> str:
        status, lines, _ = timed(cluster, 0, "GET", f"/v1/cache/{key}/lines", None, 5)
        assert status == 200, lines
        return str(lines["home"])

    # Keys of this test's own (the clients do not touch them): one homed on the node the
    # writes below go through, of which the cut-off node holds a shared copy, and one
    # homed on the cut-off node. The first must be homed there: its invalidation is
    # what makes that node find the cut-off one unreachable (homed on the third node,
    # it taught only that one, and a CI run then waited out the 7 s bound below).
    writer = cluster.nodes[2].node_id
    probes = [f"probe-{i}" for i in range(40)]
    reachable = next(k for k in probes if home_of(k) == writer)
    unreachable = next((k for k in probes if home_of(k) == cut_off), None)
    status, reply, _ = timed(cluster, 0, "PUT", f"/v1/cache/{reachable}", {"value": 0}, 10)
    assert status == 200, reply
    status, reply, _ = timed(cluster, victim, "GET", f"/v1/cache/{reachable}", None, 10)
    assert status == 200, reply
    lab.isolate(victim)
    cut_at = time.monotonic()
    cut_outcomes = dict(history.outcomes)
    # Through the others, a key homed among them takes writes: the first waits for the
    # cut-off node's shared copy to lapse (its lease, 5 s), the next ones do not.
    took = []
    for n in range(3):
        status, reply, seconds = timed(cluster, 2, "PUT", f"/v1/cache/{reachable}",
                                       {"value": {"probe": n}}, 10)
        assert status == 200, (status, reply)
        took.append(round(seconds, 2))
    assert max(took[1:]) < 1.0, took
    if unreachable is not None:
        # Its home is cut off: 503, and at once. The invalidation of the first write
        # above went unanswered for a second, so its sockets were pinged and the silent
        # ones closed: the node knows the home is unreachable (without that, 7 s).
        status, reply, seconds = timed(cluster, 2, "PUT", f"/v1/cache/{unreachable}",
                                       {"value": "x"}, 10)
        assert status == 503 and seconds < 2.0, (status, reply, seconds)
    print(f"writes to {reachable} (home {home_of(reachable)}) during the cut took {took} s; "
          f"{unreachable} (home {cut_off}): {status} in {seconds:.2f} s")
    time.sleep(max(0.0, cut_at + 6 - time.monotonic()))
    during = {k: history.outcomes[k] - cut_outcomes.get(k, 0) for k in history.outcomes}
    lab.heal()
    for t in threads:
        t.join(14 + 3 * cache_run.TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a client hung"
    print(f"outcomes: {dict(history.outcomes)}; while node2 was cut off: {during}")
    assert not history.errors, history.errors[:5]
    history.checker.assert_ok("during the run")

    # After the heal every key reads back, through every node, at least as new as its
    # last acknowledged write.
    cache_run.wait_ready(cluster)
    assert cache_run.read_back(cluster, history) == len(cache_run.KEYS) * cluster.size
    history.checker.assert_ok("after the heal")


def test_a_one_link_cut_leaves_the_leader_in_place(lab: NetLab, cluster: LocalCluster) -> None:
    """Leader and one follower lose their link; both still reach the third node. The
    stranded follower's pre-votes are refused (the third node hears the leader), so the
    leader is never deposed and the term does not move; writes go on through the two
    connected nodes, the stranded one answers its clients 503, and catches up after."""
    leader = cluster.wait_for_leader(30)
    before = cluster.health(leader)
    assert before is not None
    stranded, bridge = (leader + 1) % 3, (leader + 2) % 3
    lab.cut(leader, stranded)
    deadline = time.monotonic() + 6
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        for node in (leader, bridge):
            status, reply, took = timed(cluster, node, "POST",
                                        f"/v1/locks/one-link-{rounds}-{node}",
                                        {"owner": f"n{node}", "request_id": f"r{rounds}-{node}"},
                                        5)
            assert status == 200 and took < 1.0, (node, status, reply, took)
        views = [cluster.health(i, timeout=1.0) for i in (leader, bridge)]
        assert all(v and v["term"] == before["term"] and v["leader"] == before["node"]
                   for v in views), views
        time.sleep(0.2)
    status, reply, took = timed(cluster, stranded, "POST", "/v1/locks/one-link-stranded",
                                {"owner": "s"}, 10)
    assert status == 503 and took < ANSWER_BOUND_SECONDS, (status, reply, took)
    lab.heal()
    views = wait_converged(cluster, 20)
    assert views[0]["term"] == before["term"] and views[0]["leader"] == before["node"], views
    print(f"{rounds} rounds of writes while the link was cut; term stayed {before['term']}")
