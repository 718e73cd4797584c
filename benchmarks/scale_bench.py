"""Load shapes that used to break the service by their size, not their rate.

    python benchmarks/scale_bench.py hot-lock --waiters 2000
    python benchmarks/scale_bench.py unacked --messages 200000
    python benchmarks/scale_bench.py cache-churn --keys 24000
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

Without --url it starts its own local 3-node cluster (cache-churn with 200 cache lines
per node, so that the bound shows on a small run) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

import aiohttp  # noqa: E402

from benchmarks.common import latency_line, local_cluster_handle, run  # noqa: E402
from service.cluster import LocalCluster  # noqa: E402
from service.transport.sessions import client_session  # noqa: E402

CHURN_CAPACITY = 200  # cache lines per node on a cluster of its own
MAX_SECONDS = 600.0  # every scenario's bound


def session() -> aiohttp.ClientSession:
    return client_session(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=MAX_SECONDS),
    )


async def request(
    s: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with s.request(method, url, json=body) as r:
        return r.status, await r.json(content_type=None)


async def hot_lock(urls: list[str], waiters: int) -> int:
    name = f"hot-{int(time.time() * 1000)}"
    async with session() as s:
        status, held = await request(
            s, "POST", f"{urls[0]}/v1/locks/{name}", {"owner": "holder", "ttl_ms": 600_000}
        )
        if status != 200:
            print(f"could not take the lock: {status} {held}")
            return 1
        term = (await request(s, "GET", f"{urls[0]}/health"))[1]["term"]
        tokens: list[int] = []
        problems: list[str] = []

        async def waiter(i: int) -> None:
            url = f"{urls[i % len(urls)]}/v1/locks/{name}"
            body = {"owner": f"w{i}", "ttl_ms": 600_000, "wait_ms": int(MAX_SECONDS * 1000)}
            status, got = await request(s, "POST", url, body)
            if status != 200:
                problems.append(f"w{i}: {status} {got}")
                return
            tokens.append(got["token"])
            status, _ = await request(s, "DELETE", url, {"owner": f"w{i}", "token": got["token"]})
            if status != 200:
                problems.append(f"w{i} release: {status}")

        started = time.monotonic()
        tasks = [asyncio.create_task(waiter(i)) for i in range(waiters)]
        queued = 0
        while time.monotonic() - started < MAX_SECONDS:
            view = (await request(s, "GET", f"{urls[0]}/v1/locks/{name}"))[1]
            queued = len(view.get("waiters", []))
            if queued == waiters:
                break
            await asyncio.sleep(0.2)
        print(f"queued: {queued} of {waiters} in {time.monotonic() - started:.1f} s")
        drained_from = time.monotonic()
        await request(s, "DELETE", f"{urls[0]}/v1/locks/{name}",
                      {"owner": "holder", "token": held["token"]})  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*tasks), MAX_SECONDS)
        drained = time.monotonic() - drained_from
        term_after = (await request(s, "GET", f"{urls[0]}/health"))[1]["term"]
    print(f"drained: {len(tokens)} grants in {drained:.1f} s = {len(tokens) / drained:.0f} "
          f"grants/s; distinct tokens {len(set(tokens))}")  # fmt: skip
    print(f"elections: {term_after - term} (term {term} -> {term_after})")
    print(f"errors: {len(problems)}", *problems[:5], sep="\n  ")
    return 0 if not problems and len(set(tokens)) == waiters else 1


async def unacked(urls: list[str], messages: int) -> int:
    queue = f"unacked-{int(time.time() * 1000)}"
    async with session() as s:
        status, made = await request(s, "PUT", f"{urls[0]}/v1/queues/{queue}",
                                     {"partitions": 6})  # fmt: skip
        if status != 201:
            print(f"could not create the queue: {status} {made}")
            return 1
        gate = asyncio.Semaphore(16)
        term = (await request(s, "GET", f"{urls[0]}/health"))[1]["term"]

        async def publish(batch: int) -> None:
            body = {"messages": [{"body": {"n": batch * 100 + j}} for j in range(100)]}
            async with gate:
                status, got = await request(
                    s, "POST", f"{urls[batch % len(urls)]}/v1/queues/{queue}/messages", body
                )
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
            url = f"{urls[c % len(urls)]}/v1/queues/{queue}/consume"
            body = {"group": "g", "consumer": f"c{c}", "max": 100, "visibility_ms": 600_000}
            while time.monotonic() - started < MAX_SECONDS:
                sent = time.monotonic()
                status, got = await request(s, "POST", url, body)
                latencies.append((time.monotonic() - sent) * 1000)
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
        term_after = (await request(s, "GET", f"{urls[0]}/health"))[1]["term"]
    print(f"consumed unacked: {len(ids)} msgs ({len(set(ids))} distinct) in {took:.1f} s "
          f"= {len(ids) / took:.0f} msgs/s (more than distinct: redeliveries, as after a "
          "partition moved)")  # fmt: skip
    print(latency_line("consume request", latencies))
    print(f"elections: {term_after - term} (term {term} -> {term_after})")
    print(f"errors: {errors}")
    return 0 if len(set(ids)) == messages // 100 * 100 else 1


async def cache_churn(urls: list[str], keys: int, cluster: LocalCluster | None) -> int:
    async with session() as s:
        gate = asyncio.Semaphore(32)
        errors = 0

        async def churn(i: int) -> None:
            nonlocal errors
            key = f"churn-{int(time.time())}-{i}"
            async with gate:
                writer, reader = urls[i % len(urls)], urls[(i + 1) % len(urls)]
                steps = [("PUT", writer, {"value": "x" * 100}), ("GET", reader, None),
                         ("DELETE", writer, None)]  # fmt: skip
                for method, node, body in steps:
                    status, _ = await request(s, method, f"{node}/v1/cache/{key}", body)
                    errors += status != 200

        started = time.monotonic()
        await asyncio.gather(*(churn(i) for i in range(keys)))
        print(f"churned: {keys} keys (write, read elsewhere, delete) in "
              f"{time.monotonic() - started:.1f} s; errors: {errors}")  # fmt: skip
        for i in range(3 * CHURN_CAPACITY):  # push the deletions out of small caches
            await request(s, "PUT", f"{urls[i % len(urls)]}/v1/cache/live-{i}", {"value": i})
        await asyncio.sleep(1.0)
        _, view = await request(s, "GET", f"{urls[0]}/v1/cache?scope=cluster")
    for node, v in sorted(view["nodes"].items()):
        line = (f"{node}: cache lines {v['size']['entries']}, directory entries "
                f"{v['directory']['entries']}, retired {v['directory']['retired']}, "
                f"txn floors {v['txn_floors']}")  # fmt: skip
        if cluster is not None:
            line += f", Redis keys {redis_keys(cluster, node)}"
        print(line)
    return 0 if errors == 0 else 1


def redis_keys(cluster: LocalCluster, node_id: str) -> int:
    import redis

    from service.config import REDIS_PORT_OFFSET

    node = next(n for n in cluster.nodes if n.node_id == node_id)
    return int(redis.Redis(port=node.port + REDIS_PORT_OFFSET).dbsize())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("hot-lock", "unacked", "cache-churn"))
    parser.add_argument("--url", help="comma-separated node URLs (default: a local cluster)")
    parser.add_argument("--waiters", type=int, default=2_000)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=24_000)
    args = parser.parse_args(argv)
    for name in ("waiters", "messages", "keys"):
        if not 1 <= getattr(args, name) <= 10_000_000:
            parser.error(f"--{name} must be between 1 and 10,000,000")

    def scenario(urls: list[str], cluster: LocalCluster | None) -> int:
        if args.scenario == "hot-lock":
            return run(hot_lock(urls, args.waiters))
        if args.scenario == "unacked":
            return run(unacked(urls, args.messages))
        return run(cache_churn(urls, args.keys, cluster))

    if args.url:
        return scenario([u.rstrip("/") for u in args.url.split(",")], None)
    env = {"CACHE_MAX_ENTRIES": str(CHURN_CAPACITY)} if args.scenario == "cache-churn" else {}
    with local_cluster_handle(3, None, env) as cluster:
        return scenario([n.url for n in cluster.nodes], cluster)


if __name__ == "__main__":
    sys.exit(main())
