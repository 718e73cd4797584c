"""Real processes on loopback: kill -9 (node and its Redis), restart all, pause.

Every acknowledged write must survive; histories recorded by concurrent clients must be
linearizable (a timeout is "unknown", never "failed").
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
import redis

from service.cluster import LocalCluster, http_json
from service.commands import decode_command
from service.config import default_redis_port
from service.raft.messages import EntryKind
from service.storage.codec import decode_entry
from service.storage.keys import LOG
from tests.helpers.linearizability import Op, check

pytestmark = pytest.mark.slow


def put(cluster: LocalCluster, node: int, key: str, value: str, rid: str | None = None,
        timeout: float = 3.0) -> tuple[int, dict]:
    body = {"value": value}
    if rid is not None:
        body["request_id"] = rid
    try:
        return http_json("PUT", f"{cluster.nodes[node].url}/v1/kv/{key}", body, timeout=timeout)
    except (OSError, ValueError):
        return 0, {}


def get(cluster: LocalCluster, node: int, key: str, timeout: float = 3.0) -> tuple[int, dict]:
    try:
        return http_json("GET", f"{cluster.nodes[node].url}/v1/kv/{key}", timeout=timeout)
    except (OSError, ValueError):
        return 0, {}


def put_until_ok(cluster: LocalCluster, nodes: list[int], key: str, value: str,
                 deadline: float) -> float | None:
    """Retry one logical write (same request_id) over nodes until acknowledged."""
    rid = uuid.uuid4().hex
    attempt = 0
    while time.monotonic() < deadline:
        status, _ = put(cluster, nodes[attempt % len(nodes)], key, value, rid, timeout=1.0)
        if status == 200:
            return time.monotonic()
        attempt += 1
        time.sleep(0.01)
    return None


def wait_caught_up(cluster: LocalCluster, index: int, target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader = cluster.leader()
        mine, theirs = cluster.health(index), cluster.health(leader) if leader is not None else None
        if mine and theirs and mine.get("applied_index", -1) >= theirs["commit_index"] >= target:
            return
        time.sleep(0.1)
    raise AssertionError(f"node {index} did not catch up within {timeout} s")


def test_leader_kill_and_full_restart_lose_nothing(cluster: LocalCluster) -> None:
    cluster.wait_for_leader(30)
    acked: dict[str, str] = {}
    for i in range(30):
        key, value = f"k{i}", f"v{i}"
        assert put_until_ok(cluster, [i % 3], key, value, time.monotonic() + 10) is not None
        acked[key] = value

    leader = cluster.wait_for_leader(10)
    survivors = [i for i in range(3) if i != leader]
    killed_at = time.monotonic()
    cluster.kill(leader)  # the node and its redis-server, as a machine crash
    served_at = put_until_ok(cluster, survivors, "after-kill", "x", killed_at + 15)
    assert served_at is not None, "no write was accepted after the leader was killed"
    failover = served_at - killed_at
    print(f"failover: a new leader accepted a write {failover:.3f} s after kill -9")
    # The 1 s target is measured by `python -m service drill failover`; here a looser bound
    # keeps a loaded CI machine from flaking while still catching a broken failover.
    assert failover < 2.0
    acked["after-kill"] = "x"

    for i in range(10):
        key = f"m{i}"
        assert put_until_ok(cluster, survivors, key, key, time.monotonic() + 10) is not None
        acked[key] = key

    cluster.start(leader)  # the old leader comes back over the Redis it left behind
    status = cluster.health(survivors[0])
    assert status is not None
    wait_caught_up(cluster, leader, status["commit_index"], timeout=20)

    before = {i: cluster.health(i) for i in range(3)}
    assert all(before.values())
    cluster.kill_all()
    cluster.start()
    # Each node's first answer shows the state it loaded from its own Redis, before any
    # new election could change it: term and applied state must be all there.
    for i in range(3):
        deadline = time.monotonic() + 30
        view = None
        while time.monotonic() < deadline:
            view = cluster.health(i)
            if view and view.get("status") == "ok":
                break
            time.sleep(0.02)
        assert view and view.get("status") == "ok", f"node {i} did not come back"
        assert view["term"] >= before[i]["term"]
        # Everything applied before is in the log it loaded. Its applied state in Redis
        # may be a write behind (written in the background); the entries after it are
        # applied again once a leader tells the node they are committed.
        assert view["last_log_index"] >= before[i]["applied_index"]

    cluster.wait_for_leader(30)
    for i in range(3):
        wait_caught_up(cluster, i, before[i]["applied_index"], timeout=20)
    for n, (key, value) in enumerate(sorted(acked.items())):
        status, body = get(cluster, n % 3, key)
        assert status == 200, (key, status, body)
        assert body["value"] == value


def test_paused_leader_is_replaced_and_steps_down(cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader(30)
    old = cluster.health(leader)
    assert old is not None
    cluster.pause(leader)  # SIGSTOP: alive but silent, like a long GC pause
    try:
        others = [i for i in range(3) if i != leader]
        assert put_until_ok(cluster, others, "during-pause", "1", time.monotonic() + 15)
    finally:
        cluster.resume(leader)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        view = cluster.health(leader)
        if view and view["role"] != "leader" and view["term"] > old["term"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the resumed old leader did not step down")
    status, body = get(cluster, leader, "during-pause")
    assert (status, body.get("value")) == (200, "1")


def peer_sockets(cluster: LocalCluster, node: int) -> dict[str, float]:
    """The node's open peer sockets by kind, and its failed Raft sends, from /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = cluster.nodes[node].url + "/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dsync_peer_sockets":
                found[sample.labels["kind"]] = sample.value
            elif sample.name == "dsync_raft_send_failures_total":
                found["send_failures"] = sample.value
    return found


def test_a_follower_silent_past_the_heartbeat_is_cut_off_and_reconnected(
    cluster: LocalCluster,
) -> None:
    """A follower paused longer than the sockets' ping window (4 s, plus 2 s for the
    pong): the leader closes its socket and keeps failing to open one (the handshake
    goes unanswered) while writes go on; once it resumes, a socket is open again and
    it catches up."""
    leader = cluster.wait_for_leader(30)
    follower = (leader + 1) % 3
    before = peer_sockets(cluster, leader)
    assert before["raft_out"] == 2, before
    cluster.pause(follower)
    try:
        time.sleep(7.5)
        assert put_until_ok(cluster, [leader], "while-silent", "1", time.monotonic() + 10)
        during = peer_sockets(cluster, leader)
        assert during["raft_out"] == 1, during
        assert during["send_failures"] > before.get("send_failures", 0), during
    finally:
        cluster.resume(follower)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        view = cluster.health(follower)
        if (
            peer_sockets(cluster, leader)["raft_out"] == 2
            and view is not None
            and view["applied_index"] >= commit_index_of(cluster, leader)
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the resumed follower did not reconnect and catch up")
    status, body = get(cluster, follower, "while-silent")
    assert (status, body.get("value")) == (200, "1")


def commit_index_of(cluster: LocalCluster, node: int) -> int:
    view = cluster.health(node)
    return view["commit_index"] if view is not None else 1 << 62


def test_history_with_leader_kill_is_linearizable(cluster: LocalCluster) -> None:
    cluster.wait_for_leader(30)
    keys = ["r0", "r1", "r2"]
    history: dict[str, list[Op]] = {k: [] for k in keys}
    lock = threading.Lock()
    stop_at = time.monotonic() + 8.0
    t0 = time.monotonic()

    def client(cid: int) -> None:
        rng = random.Random(cid)
        for n in range(10_000):
            if time.monotonic() >= stop_at:
                return
            key = rng.choice(keys)
            node = rng.randrange(3)
            start = time.monotonic() - t0
            if rng.random() < 0.5:
                value = f"c{cid}-{n}"
                status, _ = put(cluster, node, key, value, timeout=2.0)
                end = time.monotonic() - t0
                if status == 200:
                    op = Op(cid, "write", value, start, end)
                elif 400 <= status < 500:
                    op = Op(cid, "write", value, start, end, ok=False)
                else:
                    op = Op(cid, "write", value, start, None)  # unknown outcome
            else:
                status, body = get(cluster, node, key, timeout=2.0)
                end = time.monotonic() - t0
                if status == 200:
                    op = Op(cid, "read", body["value"], start, end)
                elif status == 404:
                    op = Op(cid, "read", None, start, end)
                else:
                    continue
            with lock:
                history[key].append(op)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    victim = cluster.wait_for_leader(10)
    cluster.kill(victim)
    time.sleep(2.5)
    cluster.start(victim)
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)

    total = sum(len(ops) for ops in history.values())
    completed_writes = sum(
        1 for ops in history.values() for op in ops if op.kind == "write" and op.completed
    )
    assert completed_writes > 20, f"too little progress to judge: {completed_writes} writes"
    for key, ops in history.items():
        ok, why = check(ops)
        assert ok, f"key {key}: {why}"
    print(f"checked {total} operations on {len(keys)} registers: linearizable")
    # Every value was written by one PUT, without a request_id: it must be in the log
    # once. (Regression: a PUT that reached the killed leader was sent again by the
    # follower that forwarded it, and applied twice - in about half of the runs, though
    # the history check above caught it only once; see service/transport/sessions.py.)
    leader = cluster.wait_for_leader(10)
    assert puts_logged_twice(cluster, leader) == {}


def puts_logged_twice(cluster: LocalCluster, index: int) -> dict[str, list[int]]:
    """kv.put values that appear more than once in node `index`'s Raft log -> indexes."""
    client = redis.Redis(port=default_redis_port(cluster.nodes[index].port))
    try:
        members = client.zrange(LOG, 0, -1)
    finally:
        client.close()
    where: dict[str, list[int]] = {}
    for member in members:
        entry = decode_entry(member)
        if entry.kind != EntryKind.NORMAL or not entry.data:
            continue
        command = decode_command(entry.data)
        if command.op == "kv.put":
            where.setdefault(str(command.args["value"]), []).append(entry.index)
    return {value: indexes for value, indexes in where.items() if len(indexes) > 1}
