"""Load shapes that used to break the service by their size, not their rate.

    python benchmarks/scale_bench.py hot-lock --waiters 2000
    python benchmarks/scale_bench.py unacked --messages 200000
    python benchmarks/scale_bench.py cache-churn --keys 24000
    python benchmarks/scale_bench.py held-locks --locks 60000
    python benchmarks/scale_bench.py mass-expiry --locks 30000
    python benchmarks/scale_bench.py long-poll --consumers 2000
    python benchmarks/scale_bench.py kill-waiters --waiters 2000
    python benchmarks/scale_bench.py hot-lock --url http://127.0.0.1:8001,...

- hot-lock: one lock is held while --waiters clients block on it (through every node);
  then it is released and each waiter releases as soon as it is granted. Prints how many
  were queued, the drain time, grants and distinct tokens, and whether the Raft term
  moved (an election). A deadlock check cubic in the queue once lost the leader here.
- unacked: --messages messages are published to a 6-partition queue in batches of 100,
  then 16 consumers take them all (100 at a time) without acking. Prints how long that
  took and the consume latency. Each consume once walked every pending delivery.
- cache-churn: --keys distinct keys are each written through one node, read through the
  next and deleted; then a few live keys push the rest out of small caches. Prints the
  directory entries, retired entries, txn floors and Redis keys per node. Each distinct
  key once left state on every node for good.
- held-locks: --locks distinct locks are acquired (64 at a time, through every node) and
  kept; then 64 clients run 100 acquire+release cycles each on other locks. For each
  phase it prints the acquire latency and, per node, the snapshots taken (one every
  10,000 log entries: count, mean, the bucket of the longest), event-loop stalls and the
  Raft term, from /metrics. Each snapshot once re-encoded every held lock on the loop.
- mass-expiry: --locks locks are acquired with a lease (--ttl-ms, 15 s) nobody renews, and
  the leader is killed -9: the new one gives every lease a full TTL at once, so they all
  end together. Prints when the first and the last were expired and the acquire latency
  of other clients meanwhile. The leader's expiry scan once sorted every due lease,
  every 50 ms, to propose 256. Needs a cluster of its own (no --url).
- long-poll: --consumers consumers long-poll an empty queue (20 s polls, through every
  node); prints the nodes' CPU while they wait (own cluster only), then publishes as many
  messages, one request each, and prints how long publishing and consuming all of them
  took, duplicates and publish failures. Each waiting consumer once looked every 0.1 s
  and asked every other node every 0.5 s: 2,000 of them took a core, 5,000 starved the
  publishes.
- kill-waiters: one lock is held (3 s lease) while --waiters clients block on it through
  the two followers; then the leader is killed -9. Prints how many waiters were granted
  (once each, releasing at once) and how long that took. Followers used to answer every
  forwarded wait 503 "outcome unknown" while the waits stayed queued, to be granted to
  nobody. Needs a cluster of its own (no --url).

Without --url it starts its own local 3-node cluster (cache-churn with 200 cache lines
per node, so that the bound shows on a small run) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    add_http_client_argument,
    latency_line,
    local_cluster_handle,
    run,
)
from benchmarks.http_client import JsonClient, open_clients  # noqa: E402
from service.cluster import LocalCluster  # noqa: E402

CHURN_CAPACITY = 200  # cache lines per node on a cluster of its own
MAX_SECONDS = 600.0  # every scenario's bound
CYCLES_PER_CLIENT = 100  # held-locks: 64 x 100 x 2 = 12,800 log entries, a snapshot's worth


async def call(
    nodes: list[JsonClient], i: int, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """A request through node i mod N (benchmarks/http_client.py: status 0 on a failure)."""
    status, answer, _ = await nodes[i % len(nodes)].request(method, path, body, MAX_SECONDS)
    return status, answer


async def hot_lock(nodes: list[JsonClient], waiters: int) -> int:
    path = f"/v1/locks/hot-{int(time.time() * 1000)}"
    status, held = await call(nodes, 0, "POST", path, {"owner": "holder", "ttl_ms": 600_000})
    if status != 200:
        print(f"could not take the lock: {status} {held}")
        return 1
    term = (await call(nodes, 0, "GET", "/health"))[1]["term"]
    tokens: list[int] = []
    problems: list[str] = []

    async def waiter(i: int) -> None:
        body = {"owner": f"w{i}", "ttl_ms": 600_000, "wait_ms": int(MAX_SECONDS * 1000)}
        status, got = await call(nodes, i, "POST", path, body)
        if status != 200:
            problems.append(f"w{i}: {status} {got}")
            return
        tokens.append(got["token"])
        status, _ = await call(nodes, i, "DELETE", path, {"owner": f"w{i}", "token": got["token"]})
        if status != 200:
            problems.append(f"w{i} release: {status}")

    started = time.monotonic()
    tasks = [asyncio.create_task(waiter(i)) for i in range(waiters)]
    queued = 0
    while time.monotonic() - started < MAX_SECONDS:
        queued = len((await call(nodes, 0, "GET", path))[1].get("waiters", []))
        if queued + len(problems) >= waiters:  # a waiter that failed never queues
            break
        await asyncio.sleep(0.2)
    print(f"queued: {queued} of {waiters} in {time.monotonic() - started:.1f} s")
    drained_from = time.monotonic()
    await call(nodes, 0, "DELETE", path, {"owner": "holder", "token": held["token"]})
    await asyncio.wait_for(asyncio.gather(*tasks), MAX_SECONDS)
    drained = time.monotonic() - drained_from
    term_after = (await call(nodes, 0, "GET", "/health"))[1]["term"]
    print(f"drained: {len(tokens)} grants in {drained:.1f} s = {len(tokens) / drained:.0f} "
          f"grants/s; distinct tokens {len(set(tokens))}")  # fmt: skip
    print(f"elections: {term_after - term} (term {term} -> {term_after})")
    print(f"errors: {len(problems)}", *problems[:5], sep="\n  ")
    return 0 if not problems and len(set(tokens)) == waiters else 1


async def unacked(nodes: list[JsonClient], messages: int) -> int:
    path = f"/v1/queues/unacked-{int(time.time() * 1000)}"
    status, made = await call(nodes, 0, "PUT", path, {"partitions": 6})
    if status != 201:
        print(f"could not create the queue: {status} {made}")
        return 1
    gate = asyncio.Semaphore(16)
    term = (await call(nodes, 0, "GET", "/health"))[1]["term"]

    async def publish(batch: int) -> None:
        body = {"messages": [{"body": {"n": batch * 100 + j}} for j in range(100)]}
        async with gate:
            status, got = await call(nodes, batch, "POST", f"{path}/messages", body)
        if status != 201:
            raise RuntimeError(f"publish: {status} {got}")

    started = time.monotonic()
    await asyncio.gather(*(publish(b) for b in range(messages // 100)))
    print(f"published: {messages // 100 * 100} msgs in {time.monotonic() - started:.1f} s")
    ids: list[str] = []
    latencies: list[float] = []
    errors = 0

    async def consumer(c: int) -> None:
        nonlocal errors
        body = {"group": "g", "consumer": f"c{c}", "max": 100, "visibility_ms": 600_000}
        while time.monotonic() - started < MAX_SECONDS:
            status, got, seconds = await nodes[c % len(nodes)].request(
                "POST", f"{path}/consume", body, MAX_SECONDS
            )
            latencies.append(seconds * 1000)
            if status != 200:
                errors += 1
                await asyncio.sleep(0.1)
                continue
            if not got["messages"]:
                return
            ids.extend(m["id"] for m in got["messages"])

    started = time.monotonic()
    await asyncio.gather(*(consumer(c) for c in range(16)))
    took = time.monotonic() - started
    term_after = (await call(nodes, 0, "GET", "/health"))[1]["term"]
    print(f"consumed unacked: {len(ids)} msgs ({len(set(ids))} distinct) in {took:.1f} s "
          f"= {len(ids) / took:.0f} msgs/s (more than distinct: redeliveries, as after a "
          "partition moved)")  # fmt: skip
    print(latency_line("consume request", latencies))
    print(f"elections: {term_after - term} (term {term} -> {term_after})")
    print(f"errors: {errors}")
    return 0 if len(set(ids)) == messages // 100 * 100 else 1


async def cache_churn(nodes: list[JsonClient], keys: int, cluster: LocalCluster | None) -> int:
    gate = asyncio.Semaphore(32)
    errors = 0

    async def churn(i: int) -> None:
        nonlocal errors
        path = f"/v1/cache/churn-{int(time.time())}-{i}"
        async with gate:
            steps = [(i, "PUT", {"value": "x" * 100}), (i + 1, "GET", None), (i, "DELETE", None)]
            for node, method, body in steps:  # write, read through the next node, delete
                status, _ = await call(nodes, node, method, path, body)
                errors += status != 200

    started = time.monotonic()
    await asyncio.gather(*(churn(i) for i in range(keys)))
    print(f"churned: {keys} keys (write, read elsewhere, delete) in "
          f"{time.monotonic() - started:.1f} s; errors: {errors}")  # fmt: skip
    for i in range(3 * CHURN_CAPACITY):  # push the deletions out of small caches
        await call(nodes, i, "PUT", f"/v1/cache/live-{i}", {"value": i})
    await asyncio.sleep(1.0)
    _, view = await call(nodes, 0, "GET", "/v1/cache?scope=cluster")
    for node, v in sorted(view["nodes"].items()):
        line = (f"{node}: cache lines {v['size']['entries']}, directory entries "
                f"{v['directory']['entries']}, retired {v['directory']['retired']}, "
                f"txn floors {v['txn_floors']}")  # fmt: skip
        if cluster is not None:
            line += f", Redis keys {redis_keys(cluster, node)}"
        print(line)
    return 0 if errors == 0 else 1


async def held_locks(nodes: list[JsonClient], urls: list[str], locks: int) -> int:
    prefix = f"held-{int(time.time() * 1000)}"
    before = [await asyncio.to_thread(node_metrics, url) for url in urls]
    latencies: list[float] = []
    errors: list[str] = []
    todo = iter(range(locks))

    async def client() -> None:
        for i in todo:
            body = {"owner": f"o{i}", "ttl_ms": 600_000}
            status, got, seconds = await nodes[i % len(nodes)].request(
                "POST", f"/v1/locks/{prefix}-{i}", body, MAX_SECONDS
            )
            latencies.append(seconds * 1000)
            if status != 200:
                errors.append(f"{status} {got}")

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(64)))
    took = time.monotonic() - started
    print(f"acquired: {locks - len(errors)} of {locks} locks in {took:.1f} s "
          f"= {locks / took:.0f}/s")  # fmt: skip
    print(latency_line("acquire", latencies))
    await report_snapshots(urls, before)
    # Then other traffic while they stay held: the snapshots it brings find them idle.
    before = [await asyncio.to_thread(node_metrics, url) for url in urls]
    latencies.clear()

    async def cycles(c: int) -> None:
        path = f"/v1/locks/{prefix}-busy-{c}"
        for _ in range(CYCLES_PER_CLIENT):
            status, got, seconds = await nodes[c % len(nodes)].request(
                "POST", path, {"owner": f"busy{c}", "ttl_ms": 10_000}, MAX_SECONDS
            )
            latencies.append(seconds * 1000)
            if status != 200:
                errors.append(f"{status} {got}")
                return
            body = {"owner": f"busy{c}", "token": got["token"]}
            status, got, _ = await nodes[c % len(nodes)].request(
                "DELETE", path, body, MAX_SECONDS
            )
            if status != 200:
                errors.append(f"{status} {got}")
                return

    started = time.monotonic()
    await asyncio.gather(*(cycles(c) for c in range(64)))
    print(f"then {64 * CYCLES_PER_CLIENT} acquire+release cycles on other locks in "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    print(latency_line("acquire", latencies))
    await report_snapshots(urls, before)
    print(f"errors: {len(errors)}", *errors[:5], sep="\n  ")
    return 0 if not errors else 1


async def mass_expiry(
    nodes: list[JsonClient], locks: int, ttl_ms: int, cluster: LocalCluster
) -> int:
    prefix = f"expiring-{int(time.time() * 1000)}"
    errors: list[str] = []
    todo = iter(range(locks))

    async def hold() -> None:
        for i in todo:
            status, got = await call(
                nodes, i, "POST", f"/v1/locks/{prefix}-{i:07d}",
                {"owner": f"o{i}", "ttl_ms": ttl_ms},
            )
            if status != 200:
                errors.append(f"{status} {got}")

    started = time.monotonic()
    await asyncio.gather(*(hold() for _ in range(64)))
    print(f"held: {locks - len(errors)} locks with a {ttl_ms} ms lease, acquired in "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    # A new leader gives every lease a full TTL at once: they all end together.
    old = await asyncio.to_thread(cluster.wait_for_leader)
    cluster.kill(old)
    killed = time.monotonic()
    new = await asyncio.to_thread(cluster.wait_for_leader)
    print(f"killed leader {cluster.nodes[old].node_id}; {cluster.nodes[new].node_id} leads "
          f"after {time.monotonic() - killed:.1f} s")  # fmt: skip
    live = [n for k, n in enumerate(nodes) if k != old]
    term = (await call(live, 0, "GET", "/health"))[1].get("term")
    # Same deadline for all: the expiries go in name order, first to last.
    first, last = f"{prefix}-{0:07d}", f"{prefix}-{locks - 1:07d}"
    latencies: list[float] = []
    seen: dict[str, float] = {}
    while len(seen) < 2 and time.monotonic() - killed < MAX_SECONDS:
        for name in (first, last):
            if name not in seen:
                status, view = await call(live, 0, "GET", f"/v1/locks/{name}")
                if status in (200, 404) and not view.get("holders"):
                    seen[name] = time.monotonic()
        if first in seen:  # the storm is on: what does it cost other clients?
            for c in range(8):
                path = f"/v1/locks/{prefix}-other-{c}"
                status, got, seconds = await live[c % len(live)].request(
                    "POST", path, {"owner": f"other{c}", "ttl_ms": 60_000}, MAX_SECONDS
                )
                latencies.append(seconds * 1000)
                if status == 200:
                    body = {"owner": f"other{c}", "token": got["token"]}
                    await call(live, c, "DELETE", path, body)
        await asyncio.sleep(0.02)
    status, listing = await call(live, 0, "GET", "/v1/locks")
    held = sum(1 for v in listing.get("locks", []) if v["name"].startswith(f"{prefix}-")
               and "-other-" not in v["name"])  # fmt: skip
    if len(seen) == 2:
        print(f"expired: {locks - held} of {locks}; first {seen[first] - killed:.1f} s after "
              f"the kill, last {seen[last] - seen[first]:.1f} s after the first")  # fmt: skip
    print(latency_line("other clients' acquire during the expiries", latencies))
    term_after = (await call(live, 0, "GET", "/health"))[1].get("term")
    print(f"elections after the failover: term {term} -> {term_after}")
    print(f"errors: {len(errors)}", *errors[:5], sep="\n  ")
    return 0 if not errors and held == 0 else 1


async def report_snapshots(urls: list[str], before: list[dict[str, Any]]) -> None:
    for url, was in zip(urls, before, strict=True):
        now = await asyncio.to_thread(node_metrics, url)
        count = now["snapshots"] - was["snapshots"]
        mean = (now["snapshot_s"] - was["snapshot_s"]) / count * 1000 if count else 0.0
        # Buckets count the snapshots at or under their bound: the longest new one is
        # under the lowest bound that counted every new one.
        longest = min((b for b, n in now["snapshot_buckets"].items()
                       if n - was["snapshot_buckets"].get(b, 0.0) >= count),
                      default=float("inf"))  # fmt: skip
        taken = (f"snapshots {count:.0f} (mean {mean:.0f} ms, longest <= "
                 f"{longest * 1000:.0f} ms)" if count else "snapshots 0")  # fmt: skip
        print(f"  {now['node']}: {taken}, loop stalls over 0.1 s "
              f"{now['stalls'] - was['stalls']:.0f}, term {now['term']:.0f}")  # fmt: skip


def node_metrics(url: str) -> dict[str, Any]:
    """The figures held-locks reports, from one node's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, Any] = {"node": "?", "snapshots": 0.0, "snapshot_s": 0.0,
                           "snapshot_buckets": {}, "stalls": 0.0, "term": 0.0}  # fmt: skip
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "dsync_raft_snapshot_seconds_count":
                out["snapshots"] = value
            elif name == "dsync_raft_snapshot_seconds_sum":
                out["snapshot_s"] = value
            elif name == "dsync_raft_snapshot_seconds_bucket" and labels["le"] != "+Inf":
                out["snapshot_buckets"][float(labels["le"])] = value
            elif name == "dsync_event_loop_lag_seconds_bucket":
                if labels["le"] == "0.1":
                    out["stalls"] -= value
                elif labels["le"] == "+Inf":
                    out["stalls"] += value
            elif name == "dsync_raft_term":
                out["node"], out["term"] = labels["node"], value
    return out


async def long_poll(
    nodes: list[JsonClient], urls: list[str], consumers: int, cluster: LocalCluster | None
) -> int:
    queue = f"long-poll-{int(time.time() * 1000)}"
    status, created = await call(nodes, 0, "PUT", f"/v1/queues/{queue}", {})
    if status != 201:
        print(f"could not create the queue: {status} {created}")
        return 1
    term = int((await asyncio.to_thread(node_metrics, urls[0]))["term"])
    bodies: list[Any] = []
    problems: list[str] = []
    done = asyncio.Event()

    async def consumer(i: int) -> None:
        poll = {"group": "g", "consumer": f"c{i}", "max": 1, "wait_ms": 20_000,
                "visibility_ms": 600_000}  # fmt: skip
        while not done.is_set():
            status, got = await call(nodes, i, "POST", f"/v1/queues/{queue}/consume", poll)
            if status != 200:
                problems.append(f"consume c{i}: {status} {got}")
                await asyncio.sleep(0.5)
                continue
            for message in got["messages"]:
                bodies.append(message["body"])
                ack = {"group": "g", "receipts": [message["receipt"]]}
                status, _ = await call(nodes, i, "POST", f"/v1/queues/{queue}/ack", ack)
                if status != 200:
                    problems.append(f"ack c{i}: {status}")
            if len(set(map(str, bodies))) >= consumers:
                done.set()

    tasks = [asyncio.create_task(consumer(i)) for i in range(consumers)]
    await asyncio.sleep(3.0)  # every one is waiting
    if cluster is not None:
        before, started = node_cpu_seconds(cluster), time.monotonic()
        await asyncio.sleep(10.0)
        used = (node_cpu_seconds(cluster) - before) / (time.monotonic() - started)
        print(f"{consumers} consumers waiting on an empty queue: the nodes use "
              f"{used * 100:.0f}% CPU")  # fmt: skip
    started = time.monotonic()

    async def publish(i: int) -> None:
        status, got = await call(nodes, i, "POST", f"/v1/queues/{queue}/messages", {"body": i})
        if status != 201:
            problems.append(f"publish {i}: {status} {got}")

    await asyncio.gather(*(publish(i) for i in range(consumers)))
    published = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 120.0)
    consumed = time.monotonic() - started
    done.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    term_after = int((await asyncio.to_thread(node_metrics, urls[0]))["term"])
    distinct = len(set(map(str, bodies)))
    print(f"published: {consumers} in {published:.1f} s; consumed: {len(bodies)} "
          f"({distinct} distinct, {len(bodies) - distinct} duplicates) in {consumed:.1f} s")
    print(f"elections: {term_after - term} (term {term} -> {term_after}); partition moves: "
          f"{await asyncio.to_thread(partition_moves, urls[0], queue)}")  # fmt: skip
    print(f"errors: {len(problems)}", *problems[:5], sep="\n  ")
    return 0 if not problems and distinct == consumers else 1


def partition_moves(url: str, queue: str) -> int:
    """How often the queue's partitions changed leader (each move is a new epoch): a
    move redelivers what the old leader had handed out but not yet replicated."""
    with urllib.request.urlopen(f"{url}/v1/queues/{queue}", timeout=30) as answer:
        view = json.load(answer)
    return sum(int(p["epoch"]) - 1 for p in view["partitions"])


async def kill_waiters(urls: list[str], waiters: int, cluster: LocalCluster, kind: str) -> int:
    leader = await asyncio.to_thread(cluster.wait_for_leader)
    nodes = open_clients(kind, [u for i, u in enumerate(urls) if i != leader], waiters + 64)
    path = f"/v1/locks/kill-{int(time.time() * 1000)}"
    try:
        status, held = await call(nodes, 0, "POST", path, {"owner": "holder", "ttl_ms": 3_000})
        if status != 200:
            print(f"could not take the lock: {status} {held}")
            return 1
        tokens: list[int] = []
        problems: list[str] = []

        async def waiter(i: int) -> None:
            body = {"owner": f"w{i}", "ttl_ms": 30_000, "wait_ms": 120_000}
            status, got = await call(nodes, i, "POST", path, body)
            if status != 200:
                problems.append(f"w{i}: {status} {got}")
                return
            tokens.append(got["token"])
            release = {"owner": f"w{i}", "token": got["token"]}
            status, _ = await call(nodes, i, "DELETE", path, release)
            if status != 200:
                problems.append(f"w{i} release: {status}")

        tasks = [asyncio.create_task(waiter(i)) for i in range(waiters)]
        started, queued = time.monotonic(), 0
        while time.monotonic() - started < MAX_SECONDS and queued + len(problems) < waiters:
            await asyncio.sleep(0.2)
            queued = len((await call(nodes, 0, "GET", path))[1].get("waiters", []))
        print(f"queued: {queued} of {waiters} through the followers; killing leader "
              f"{cluster.nodes[leader].node_id}")  # fmt: skip
        cluster.kill(leader)
        killed = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), MAX_SECONDS)
        print(f"after the kill: {len(tokens)} granted ({len(set(tokens))} distinct tokens) "
              f"in {time.monotonic() - killed:.1f} s")  # fmt: skip
        print(f"errors: {len(problems)}", *problems[:5], sep="\n  ")
        return 0 if not problems and len(set(tokens)) == waiters else 1
    finally:
        for node in nodes:
            await node.close()


def node_cpu_seconds(cluster: LocalCluster) -> float:
    """User and system CPU of the node processes so far (Linux /proc)."""
    total = 0
    for node in cluster.nodes:
        if node.process is None:
            continue
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{node.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime after the name
    return total / os.sysconf("SC_CLK_TCK")


def redis_keys(cluster: LocalCluster, node_id: str) -> int:
    import redis

    from service.config import REDIS_PORT_OFFSET

    node = next(n for n in cluster.nodes if n.node_id == node_id)
    return int(redis.Redis(port=node.port + REDIS_PORT_OFFSET).dbsize())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenario",
        choices=("hot-lock", "unacked", "cache-churn", "held-locks", "mass-expiry",
                 "long-poll", "kill-waiters"),
    )
    parser.add_argument("--url", help="comma-separated node URLs (default: a local cluster)")
    parser.add_argument("--waiters", type=int, default=2_000)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=24_000)
    parser.add_argument("--locks", type=int, default=60_000)
    parser.add_argument("--ttl-ms", type=int, default=15_000, help="mass-expiry's leases")
    parser.add_argument("--consumers", type=int, default=2_000, help="long-poll's consumers")
    add_http_client_argument(parser)
    args = parser.parse_args(argv)
    for name in ("waiters", "messages", "keys", "locks", "ttl_ms", "consumers"):
        if not 1 <= getattr(args, name) <= 10_000_000:
            parser.error(f"--{name} must be between 1 and 10,000,000")

    async def scenario_on(urls: list[str], cluster: LocalCluster | None) -> int:
        # Connections per node: every hot-lock waiter holds one while it waits.
        # (and every long-poll consumer).
        nodes = open_clients(args.http_client, urls, max(args.waiters, args.consumers) + 64)
        try:
            if args.scenario == "hot-lock":
                return await hot_lock(nodes, args.waiters)
            if args.scenario == "unacked":
                return await unacked(nodes, args.messages)
            if args.scenario == "held-locks":
                return await held_locks(nodes, urls, args.locks)
            if args.scenario == "mass-expiry":
                assert cluster is not None
                return await mass_expiry(nodes, args.locks, args.ttl_ms, cluster)
            if args.scenario == "kill-waiters":
                assert cluster is not None
                return await kill_waiters(urls, args.waiters, cluster, args.http_client)
            if args.scenario == "long-poll":
                return await long_poll(nodes, urls, args.consumers, cluster)
            return await cache_churn(nodes, args.keys, cluster)
        finally:
            for node in nodes:
                await node.close()

    def scenario(urls: list[str], cluster: LocalCluster | None) -> int:
        return run(scenario_on(urls, cluster))

    if args.url and args.scenario in ("mass-expiry", "kill-waiters"):
        parser.error(f"{args.scenario} kills the leader of a cluster of its own: no --url")
    if args.url:
        return scenario([u.rstrip("/") for u in args.url.split(",")], None)
    env = {"CACHE_MAX_ENTRIES": str(CHURN_CAPACITY)} if args.scenario == "cache-churn" else {}
    with local_cluster_handle(3, None, env) as cluster:
        return scenario([n.url for n in cluster.nodes], cluster)


if __name__ == "__main__":
    sys.exit(main())
