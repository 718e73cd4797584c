"""Nothing acknowledged is lost when a node loses its disk for good.

Raft: the node comes back with empty storage, rejoins without voting until it has caught
up (service/raft/rejoin.py), and every acknowledged write is still there.

The cache keeps every acknowledged write too.

Every node's cache store is mirrored on its peers (service/cache/mirrored.py). Here a
node is killed -9, its data directory (Redis AOF included) is deleted, and it is started
again: it must take back its lines and the directory entries and values it homes, so
every key reads back its last acknowledged value through every node. A first start with
one node missing must not wait for it (only a node that had started before restores).
"""

from __future__ import annotations

import contextlib
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from service.cluster import LocalCluster, http_json
from service.placement import home_node
from tests.integration.conftest import make_cluster

pytestmark = pytest.mark.slow

MEMBERS = ["node1", "node2", "node3"]


def cache(c: LocalCluster, node: int, method: str, key: str, body: Any = None) -> tuple[int, Any]:
    try:
        return http_json(
            method, f"{c.nodes[node].url}/v1/cache/{quote(key, safe='')}", body, timeout=10
        )
    except (OSError, ValueError):
        return 0, {}


def get_view(c: LocalCluster, node: int, path: str) -> dict[str, Any] | None:
    """GET path's JSON when the node answers 200, else None."""
    with contextlib.suppress(OSError, ValueError):
        status, body = http_json("GET", f"{c.nodes[node].url}{path}", timeout=2)
        if status == 200:
            return dict(body)
    return None


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def describe(c: LocalCluster, node: int) -> dict[str, Any] | None:
    return get_view(c, node, "/v1/cache")


def wait_ready(c: LocalCluster, nodes: list[int], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(describe(c, n) is not None for n in nodes):
            return
        time.sleep(0.1)
    raise AssertionError(f"the cache did not start on nodes {nodes}")


def wait_mirrored(c: LocalCluster, nodes: list[int], timeout: float = 20.0) -> None:
    """Until every node's active mirrors are in step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = [describe(c, n) for n in nodes]
        if all(
            v is not None
            and any(p["active"] for p in v["mirrors"]["peers"].values())
            and all(p["synced"] is not None for p in v["mirrors"]["peers"].values() if p["active"])
            for v in views
        ):
            return
        time.sleep(0.1)
    raise AssertionError("the mirrors did not get in step")


def write_all(c: LocalCluster, keys: list[str], rounds: int) -> dict[str, tuple[int, Any]]:
    """Write every key through varying nodes (owners on every node), read some through
    others (shared copies); return key -> (version, value) last acknowledged."""
    written: dict[str, tuple[int, Any]] = {}
    for r in range(rounds):
        for i, key in enumerate(keys):
            value = {"key": key, "round": r}
            status, body = cache(c, (i + r) % c.size, "PUT", key, {"value": value})
            assert status == 200, f"PUT {key}: {status} {body}"
            written[key] = (body["version"], value)
            if i % 3 == 0:
                assert cache(c, (i + r + 1) % c.size, "GET", key)[0] == 200
    return written


def check_all(c: LocalCluster, written: dict[str, tuple[int, Any]], nodes: list[int]) -> None:
    for key, (version, value) in written.items():
        for node in nodes:
            status, body = cache(c, node, "GET", key)
            assert status == 200, f"GET {key} via node{node + 1}: {status} {body}"
            assert (body["version"], body["value"]) == (version, value), (
                f"{key} via node{node + 1}: v{body['version']} {body['value']} "
                f"instead of v{version} {value}"
            )


def health(c: LocalCluster, node: int) -> dict[str, Any] | None:
    return get_view(c, node, "/health")


def test_a_raft_leader_that_lost_its_disk_rejoins_and_nothing_is_lost(
    cluster: LocalCluster,
) -> None:
    leader = cluster.wait_for_leader(30)
    written: dict[str, str] = {}
    for i in range(30):
        key, value = f"k{i}", f"v{i}"
        status, body = http_json(
            "PUT", f"{cluster.nodes[i % 3].url}/v1/kv/{key}", {"value": value}, timeout=10
        )
        assert status == 200, body
        written[key] = value
    cluster.lose_disk(leader)
    cluster.start(leader)
    deadline = time.monotonic() + 40
    view = None
    while time.monotonic() < deadline:
        view = health(cluster, leader)
        if view is not None and view.get("rejoining") is False and view["applied_index"] >= 31:
            break
        time.sleep(0.2)
    assert view is not None and view.get("rejoining") is False, view
    node_log = cluster.nodes[leader].log_path
    assert node_log is not None
    for _ in range(50):  # the marker is deleted (and that logged) within 0.2 s
        text = node_log.read_text(errors="replace")
        if "caught up after lost storage" in text:
            break
        time.sleep(0.1)
    assert "Raft storage was lost: rejoining" in text and "caught up after lost storage" in text
    victim = cluster.nodes[leader].node_id
    metrics = http_text(f"{cluster.nodes[leader].url}/metrics")
    assert f'dsync_raft_rejoining{{node="{victim}"}} 0.0' in metrics
    for key, value in written.items():
        status, body = http_json("GET", f"{cluster.nodes[leader].url}/v1/kv/{key}", timeout=10)
        assert (status, body.get("value")) == (200, value), f"{key}: {status} {body}"
    # It votes again: with it, either other node can be lost and a leader is elected.
    other = (leader + 1) % 3
    cluster.kill(other)
    new_leader = cluster.wait_for_leader(30)
    assert new_leader != other
    status, body = http_json(
        "PUT", f"{cluster.nodes[leader].url}/v1/kv/after", {"value": "x"}, timeout=10
    )
    assert status == 200, body
    cluster.start(other)


def test_a_node_that_lost_its_disk_gets_its_cache_back(cluster: LocalCluster) -> None:
    cluster.wait_for_leader(30)
    wait_ready(cluster, [0, 1, 2])
    keys = [f"disk-{i}" for i in range(36)]
    homed = sum(home_node(k, MEMBERS) == "node1" for k in keys)
    assert homed >= 5, "the test needs keys homed on the victim"
    written = write_all(cluster, keys, rounds=2)
    wait_mirrored(cluster, [0, 1, 2])

    cluster.lose_disk(0)
    cluster.start(0)
    wait_ready(cluster, [0, 1, 2])
    view = describe(cluster, 0)
    assert view is not None and view["mirrors"]["restored_from"] is not None, view
    check_all(cluster, written, [0, 1, 2])

    # The restored node works on: new writes through it, then a plain kill -9 of it.
    more = write_all(cluster, keys[:12], rounds=1)
    written.update(more)
    wait_mirrored(cluster, [0, 1, 2])
    cluster.kill(0)
    cluster.start(0)
    wait_ready(cluster, [0, 1, 2])
    check_all(cluster, written, [0, 1, 2])


def test_a_first_start_does_not_wait_for_a_missing_node(tmp_path: Path) -> None:
    c = make_cluster(tmp_path)
    try:
        c.start(0)
        c.start(1)
        c.wait_for_leader(30)
        wait_ready(c, [0, 1], timeout=30)
        keys = [k for k in (f"first-{i}" for i in range(30)) if home_node(k, MEMBERS) != "node3"]
        written = {}
        for i, key in enumerate(keys[:10]):
            status, body = cache(c, i % 2, "PUT", key, {"value": i})
            assert status == 200, f"PUT {key}: {status} {body}"
            written[key] = (body["version"], i)
        check_all(c, written, [0, 1])
        c.start(2)  # joins late: a first start as well, no restore
        wait_ready(c, [0, 1, 2])
        view = describe(c, 2)
        assert view is not None and view["mirrors"]["restored_from"] is None
        check_all(c, written, [0, 1, 2])
    finally:
        c.stop(timeout=10)
        c.kill_all()


def drain(c: LocalCluster, queue: str, expected: set[str], timeout: float = 60.0) -> set[str]:
    delivered: set[str] = set()
    deadline = time.monotonic() + timeout
    node = 0
    while time.monotonic() < deadline and not expected <= delivered:
        node = (node + 1) % c.size
        try:
            status, reply = http_json(
                "POST", f"{c.nodes[node].url}/v1/queues/{queue}/consume",
                {"consumer": "drain", "max": 200, "wait_ms": 300, "visibility_ms": 60_000},
                timeout=5,
            )  # fmt: skip
        except (OSError, ValueError):
            continue
        if status != 200:
            time.sleep(0.1)
            continue
        messages = reply["messages"]
        delivered |= {m["id"] for m in messages}
        if messages:
            with contextlib.suppress(OSError, ValueError):
                http_json(
                    "POST", f"{c.nodes[node].url}/v1/queues/{queue}/ack",
                    {"receipts": [m["receipt"] for m in messages]}, timeout=5,
                )  # fmt: skip
    return delivered


def test_queue_messages_survive_a_lost_disk(cluster: LocalCluster) -> None:
    cluster.wait_for_leader(30)
    status, reply = http_json(
        "PUT", f"{cluster.nodes[0].url}/v1/queues/lost", {"partitions": 8}, timeout=10
    )
    assert status == 201, reply
    acked: set[str] = set()
    for i in range(120):
        body = {"body": {"n": i}, "id": f"m{i}"}
        status, reply = http_json(
            "POST", f"{cluster.nodes[i % 3].url}/v1/queues/lost/messages", body, timeout=10
        )
        assert status == 201, reply
        acked.add(f"m{i}")
    _, view = http_json("GET", f"{cluster.nodes[0].url}/v1/queues/lost", timeout=10)
    victim = 0
    cluster.lose_disk(victim)
    cluster.start(victim)
    cluster.wait_for_leader(30)
    delivered = drain(cluster, "lost", acked)
    lost = sorted(acked - delivered)
    assert not lost, f"{len(lost)} acknowledged publishes lost, e.g. {lost[:5]}; before: {view}"
    # The node caught up from the partition leaders and is in sync everywhere again.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, view = http_json("GET", f"{cluster.nodes[1].url}/v1/queues/lost", timeout=10)
        if all(len(p["isr"]) == 3 for p in view["partitions"]):
            break
        time.sleep(0.3)
    assert all(len(p["isr"]) == 3 for p in view["partitions"]), view["partitions"]
    # And it settled: the node left each partition once (it used to leave, be added
    # back, lead again as the preferred replica, and leave again, every 100 ms).
    time.sleep(2.0)
    _, later = http_json("GET", f"{cluster.nodes[1].url}/v1/queues/lost", timeout=10)
    epochs = {p["partition"]: p["epoch"] for p in view["partitions"]}
    assert all(p["epoch"] == epochs[p["partition"]] for p in later["partitions"]), later
    assert max(epochs.values()) < 20, epochs


def test_large_values_travel_between_nodes_and_into_the_mirrors(cluster: LocalCluster) -> None:
    """Internal requests are not bound by the client body limit (1 MiB): a batch of
    protocol messages with large values, and a full mirror image of a node holding
    several MiB, must go through (they were refused with 413, and retried forever)."""
    cluster.wait_for_leader(30)
    wait_ready(cluster, [0, 1, 2])
    keys = [k for k in (f"big-{i}" for i in range(60)) if home_node(k, MEMBERS) == "node2"][:8]
    value = "x" * 200_000
    with ThreadPoolExecutor(len(keys)) as pool:  # concurrently: one batch to the home
        results = list(pool.map(lambda k: cache(cluster, 0, "PUT", k, {"value": value}), keys))
    assert all(status == 200 for status, _ in results), [s for s, _ in results]
    for key in keys:
        status, body = cache(cluster, 2, "GET", key)
        assert status == 200 and body["value"] == value, (key, status)
    cluster.kill(1)  # node2 comes back and sends its peer a full image of several MiB
    cluster.start(1)
    wait_ready(cluster, [0, 1, 2])
    wait_mirrored(cluster, [0, 1, 2])
    status, _ = cache(cluster, 1, "PUT", keys[0], {"value": "small"})
    assert status == 200


def test_a_queue_follower_far_behind_on_large_messages_catches_up(
    cluster: LocalCluster,
) -> None:
    """While a node is down, several MiB of messages are published; when it is back,
    what it missed (ops, or the whole partition state) must reach it although it is over
    the clients' body limit, and it must get back in sync."""
    cluster.wait_for_leader(30)
    status, reply = http_json(
        "PUT", f"{cluster.nodes[0].url}/v1/queues/big", {"partitions": 1}, timeout=10
    )
    assert status == 201, reply
    cluster.kill(2)
    payload = "y" * 100_000
    for i in range(40):
        status, reply = http_json(
            "POST", f"{cluster.nodes[i % 2].url}/v1/queues/big/messages",
            {"body": payload, "id": f"b{i}"}, timeout=15,
        )  # fmt: skip
        assert status == 201, reply
    cluster.start(2)
    deadline = time.monotonic() + 40
    isr: list[str] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            _, view = http_json("GET", f"{cluster.nodes[0].url}/v1/queues/big", timeout=10)
            isr = view["partitions"][0]["isr"]
            if len(isr) == 3:
                break
        time.sleep(0.3)
    assert len(isr) == 3, f"node3 never got back in sync: ISR {isr}"


def test_a_node_that_lost_its_disk_waits_for_every_peer_and_can_be_stopped_meanwhile(
    cluster: LocalCluster,
) -> None:
    """The newest state may be on the peer that is down: the node must not rejoin
    without it (it would take a term floor, and catch up, from the others only), and a
    signal while it waits stops it cleanly."""
    cluster.wait_for_leader(30)
    status, _ = http_json("PUT", f"{cluster.nodes[0].url}/v1/kv/a", {"value": "1"}, timeout=10)
    assert status == 200
    cluster.kill(2)
    cluster.lose_disk(0)
    cluster.start(0)
    time.sleep(3)
    view = health(cluster, 0)
    assert view is not None and view["status"] == "starting", view
    process = cluster.nodes[0].process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    node_log = cluster.nodes[0].log_path
    assert node_log is not None
    assert "Waiting for every peer to answer" in node_log.read_text(errors="replace")


def test_writes_go_on_while_the_mirroring_peer_is_paused(cluster: LocalCluster) -> None:
    """node1 mirrors to node2. SIGSTOP node2: node1's persists bring node3 in after the
    hedge delay, so writes homed on node1 keep being acknowledged, slowed by well under
    a second, and never on one disk only."""
    cluster.wait_for_leader(30)
    wait_ready(cluster, [0, 1, 2])
    keys = [k for k in (f"pause-{i}" for i in range(80)) if home_node(k, MEMBERS) == "node1"]
    keys = keys[:10]
    assert len(keys) == 10
    for key in keys:
        assert cache(cluster, 0, "PUT", key, {"value": 0})[0] == 200
    cluster.pause(1)
    try:
        slowest = 0.0
        for round_ in range(1, 4):
            for key in keys:
                started = time.monotonic()
                status, body = cache(cluster, 0, "PUT", key, {"value": round_})
                slowest = max(slowest, time.monotonic() - started)
                assert status == 200, (key, status, body)
        view = describe(cluster, 0)
        assert view is not None and view["mirrors"]["peers"]["node3"]["active"], view
        metrics = http_text(f"{cluster.nodes[0].url}/metrics")
        assert 'dsync_cache_mirror_in_step{node="node1",peer="node3"} 1.0' in metrics
        print(f"slowest write while node1's mirror was paused: {slowest:.3f} s")
        assert slowest < 2.0
    finally:
        cluster.resume(1)
