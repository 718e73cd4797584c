"""Queues under kill -9 of a node and a restart of every node.

Producers publish uniquely-id'd messages through all nodes; an outcome they could not
learn (connection lost, 503) is retried with the same id, which deduplicates. A node is
killed -9 (with its Redis) mid-run and restarted, then every node is killed and restarted.
Consumers then drain the queue: every acknowledged publish must be delivered at least
once; duplicates are counted and reported, not failed.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any

import pytest

from service.cluster import LocalCluster, http_json

pytestmark = pytest.mark.slow

QUEUE = "drill"


def call(c: LocalCluster, node: int, method: str, path: str, body: Any = None,
         timeout: float = 3.0) -> tuple[int, Any]:
    try:
        return http_json(method, c.nodes[node].url + path, body, timeout=timeout)
    except (OSError, ValueError):
        return 0, {}


def producer(c: LocalCluster, index: int, stop_at: float, acked: dict[str, float],
             errors: list[str], lock: threading.Lock) -> None:
    rng = random.Random(index)
    sent = 0
    while time.monotonic() < stop_at:
        message_id = f"p{index}-{sent}"
        sent += 1
        body = {"body": {"producer": index}, "id": message_id}
        if rng.random() < 0.5:
            body["key"] = f"k{rng.randrange(20)}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, reply = call(c, rng.randrange(c.size), "POST",
                                 f"/v1/queues/{QUEUE}/messages", body)
            if status == 201:
                with lock:
                    acked[message_id] = time.monotonic()
                break
            if status not in (0, 503):
                with lock:
                    errors.append(f"{message_id}: {status} {reply}")
                return
            time.sleep(0.05)
        else:
            with lock:
                errors.append(f"{message_id}: never acknowledged")
            return


def test_acknowledged_publishes_survive_kill_and_full_restart(cluster: LocalCluster) -> None:
    cluster.wait_for_leader(30)
    status, reply = call(cluster, 0, "PUT", f"/v1/queues/{QUEUE}", {"partitions": 8},
                         timeout=10)
    assert status == 201, reply
    acked: dict[str, float] = {}
    errors: list[str] = []
    guard = threading.Lock()
    stop_at = time.monotonic() + 8
    threads = [
        threading.Thread(target=producer, args=(cluster, i, stop_at, acked, errors, guard))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    time.sleep(2.5)
    victim = 1
    killed_at = time.monotonic()
    cluster.kill(victim)
    time.sleep(2.5)
    restarted_at = time.monotonic()
    cluster.start(victim)
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads), "a producer hung"
    assert not errors, errors[:5]
    after_kill = sorted(t for t in acked.values() if t > killed_at)
    assert after_kill, "nothing was published after the kill"
    # The target: publishing resumes within 2 s of a kill -9, i.e. between the kill and
    # the restart acknowledgments never stop for as long as that.
    moments = [killed_at, *(t for t in after_kill if t < restarted_at), restarted_at]
    stall = max(b - a for a, b in itertools.pairwise(moments))
    print(f"{len(acked)} publishes acknowledged; first after the kill -9 at "
          f"+{after_kill[0] - killed_at:.3f} s; longest pause while it was down {stall:.3f} s")
    assert stall < 2.0, f"publishing stopped for {stall:.3f} s after the kill -9"

    cluster.kill_all()
    cluster.start()
    cluster.wait_for_leader(30)

    drain(cluster, acked, visibility_ms=60_000)


def drain(c: LocalCluster, acked: dict[str, float], visibility_ms: int) -> None:
    """Consume and ack through every node in turn until every acknowledged publish was
    delivered (then 6 empty polls) or 60 s pass; AssertionError naming what was lost.
    A delivery whose answer was lost comes back after `visibility_ms`."""
    delivered: dict[str, int] = {}
    deadline = time.monotonic() + 60
    empty_polls = 0
    node = 0
    while time.monotonic() < deadline and empty_polls < 6:
        node = (node + 1) % c.size
        status, reply = call(c, node, "POST", f"/v1/queues/{QUEUE}/consume",
                             {"consumer": "drain", "max": 200, "wait_ms": 300,
                              "visibility_ms": visibility_ms}, timeout=5)
        if status != 200:
            time.sleep(0.1)
            continue
        messages = reply["messages"]
        if not messages:
            empty_polls += 1 if set(acked) <= set(delivered) else 0
            continue
        empty_polls = 0
        for m in messages:
            delivered[m["id"]] = delivered.get(m["id"], 0) + 1
        call(c, node, "POST", f"/v1/queues/{QUEUE}/ack",
             {"receipts": [m["receipt"] for m in messages]}, timeout=5)
    lost = sorted(set(acked) - set(delivered))
    duplicates = sum(n - 1 for n in delivered.values())
    unacked_extra = len(set(delivered) - set(acked))
    print(f"delivered {len(delivered)} distinct, {duplicates} duplicate deliveries, "
          f"{unacked_extra} delivered whose publish was never acknowledged")
    assert not lost, f"{len(lost)} acknowledged publishes lost, e.g. {lost[:5]}"
