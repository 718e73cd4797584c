"""Queue throughput and latency: producers and consumers in closed loops over all nodes.

    python benchmarks/queue_bench.py --producers 32 --consumers 32 --seconds 20
    python benchmarks/queue_bench.py --batch 10 --partitions 16
    python benchmarks/queue_bench.py --kill-after 5     # kill -9 a node mid-run
    python benchmarks/queue_bench.py --batch 10 --rate 3000   # offered load, not closed loop
    python benchmarks/queue_bench.py --url http://127.0.0.1:8001,http://127.0.0.1:8002,...

Without --url it starts its own local cluster on 127.0.0.1 (real node processes, each with
its own redis-server) and stops it afterwards. Producer i and consumer i talk to node
i mod N. A producer publishes --batch messages per request, each with a unique id; a
consumer consumes up to --max per request (long poll) and acks what it got in one request.

Prints published and consumed (acked) msgs/s, publish latency p50/p99 per request, and
with --kill-after the time until publishes succeed again and the worst publish stall.

Closed loop (the default) measures the most the cluster can take, and a request's latency
there is mostly its wait behind the other producers' requests: 32 producers over 350
requests/s wait about 90 ms each, however fast each request is served. With --rate the
producers offer a fixed load instead (msgs/s over all of them, each on its own schedule),
and a request's latency counts from when it was due, not when it was sent, so a producer
that falls behind shows it in its latency (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    Schedule,
    Window,
    add_http_client_argument,
    latency_line,
    local_cluster_handle,
    run,
)
from benchmarks.http_client import JsonClient, open_clients  # noqa: E402

MAX_REQUESTS_PER_CLIENT = 10_000_000


@dataclass
class Results:
    publish_ms: list[float] = field(default_factory=list)
    published: int = 0
    consumed: int = 0
    consume_requests: int = 0  # answered 200, in the window, empty or not
    errors: Counter[str] = field(default_factory=Counter)
    # (monotonic start, monotonic end) of every acknowledged publish request
    publish_spans: list[tuple[float, float]] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--producers", type=int, default=32)
    parser.add_argument("--consumers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=1, help="messages per publish request")
    parser.add_argument("--max", type=int, default=50, help="messages per consume request")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--body-bytes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=None,
                        help="offered load in msgs/s over all producers (default: closed loop)")
    parser.add_argument("--kill-after", type=float, default=None,
                        help="kill -9 node 2 (and its Redis) this many seconds into the run")
    parser.add_argument("--url", default=None, help="comma-separated node URLs")
    parser.add_argument("--base-port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=10.0)
    add_http_client_argument(parser)
    args = parser.parse_args(argv)
    if not (1 <= args.producers <= 1024 and 0 <= args.consumers <= 1024):
        parser.error("--producers must be 1..1024 and --consumers 0..1024")
    if not (1 <= args.batch <= 1000 and 1 <= args.max <= 1000):
        parser.error("--batch and --max must be 1..1000")
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    if args.rate is not None and not 0 < args.rate <= 1_000_000:
        parser.error("--rate must be in (0, 1000000] msgs/s")
    if args.kill_after is not None and args.url:
        parser.error("--kill-after needs the benchmark's own cluster (no --url)")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, urls: list[str]) -> None:
        self.args = args
        self.urls = urls
        self.queue = f"bench-{uuid.uuid4().hex[:8]}"
        self.results = Results()
        self.clients: list[JsonClient] = []
        self.window = Window(0.0, 0.0)
        self.body = "x" * args.body_bytes
        self.killed_at: float | None = None
        self.schedules: list[Schedule | None] = [None] * args.producers

    async def post(self, node: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        status, reply, _ = await self.clients[node].request("POST", path, body, self.args.timeout)
        return status, reply

    def error(self, op: str, status: int, reply: Any) -> None:
        if time.monotonic() in self.window:
            code = reply.get("error", {}).get("code") if isinstance(reply, dict) else None
            self.results.errors[f"{op} {status} {code}"] += 1

    async def producer(self, pid: int) -> None:
        node = pid % len(self.urls)
        path = f"/v1/queues/{self.queue}/messages"
        schedule = self.schedules[pid]
        for n in range(MAX_REQUESTS_PER_CLIENT):
            due = schedule.due(n) if schedule is not None else time.monotonic()
            if due >= self.window.end:
                return
            if due > time.monotonic():  # a producer behind schedule sends at once
                await asyncio.sleep(due - time.monotonic())
            batch = [{"body": self.body, "id": f"p{pid}-{n}-{i}"} for i in range(self.args.batch)]
            started = time.monotonic()
            # Retried with the same ids until answered: the ids deduplicate.
            for _attempt in range(100):
                status, reply = await self.post(node, path, {"messages": batch})
                if status == 201:
                    break
                self.error("publish", status, reply)
                if time.monotonic() >= self.window.end + self.args.timeout:
                    return
                node = (node + 1) % len(self.urls)
                await asyncio.sleep(0.02)
            else:
                continue
            now = time.monotonic()
            if now in self.window:
                self.results.publish_ms.append((now - due) * 1000)
                self.results.published += len(batch)
            self.results.publish_spans.append((started, now))

    async def consumer(self, cid: int) -> None:
        node = cid % len(self.urls)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= self.window.end:
                return
            status, reply = await self.post(
                node, f"/v1/queues/{self.queue}/consume",
                {"consumer": f"c{cid}", "max": self.args.max, "wait_ms": 200},
            )
            if status != 200:
                self.error("consume", status, reply)
                node = (node + 1) % len(self.urls)
                await asyncio.sleep(0.02)
                continue
            if time.monotonic() in self.window:
                self.results.consume_requests += 1
            messages = reply.get("messages", [])
            if not messages:
                continue
            status, reply = await self.post(
                node, f"/v1/queues/{self.queue}/ack",
                {"receipts": [m["receipt"] for m in messages]},
            )
            if status != 200:
                self.error("ack", status, reply)
                continue
            if time.monotonic() in self.window:
                self.results.consumed += int(reply.get("acked", 0))

    async def run(self, kill: Any) -> Results:
        # Every client may end up on one node (its own node died and it moved on): a pool
        # sized per node would make requests queue for connections in the client, which
        # the report would then blame on the server.
        limit = self.args.producers + self.args.consumers
        self.clients = open_clients(self.args.http_client, self.urls, limit)
        try:
            status, reply, _ = await self.clients[0].request(
                "PUT", f"/v1/queues/{self.queue}", {"partitions": self.args.partitions},
                self.args.timeout,
            )
            if status not in (200, 201):
                raise RuntimeError(f"creating the queue: {status} {reply}")
            now = time.monotonic()
            self.window = Window(now + self.args.warmup,
                                 now + self.args.warmup + self.args.seconds)
            if self.args.rate is not None:
                self.schedules = [*Schedule.spread(
                    now, self.args.rate / self.args.batch, self.args.producers)]
            tasks = [asyncio.create_task(self.producer(p)) for p in range(self.args.producers)]
            tasks += [asyncio.create_task(self.consumer(c)) for c in range(self.args.consumers)]
            if self.args.kill_after is not None:
                await asyncio.sleep(self.args.warmup + self.args.kill_after)
                self.killed_at = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, kill)
                print(f"killed node 2 with kill -9 at +{self.args.kill_after:g} s", flush=True)
            grace = self.args.warmup + self.args.seconds + self.args.timeout * 3
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for client in self.clients:
                await client.close()
        return self.results


def report(args: argparse.Namespace, bench: Bench) -> None:
    r = bench.results
    if args.rate is not None:
        print(f"offered: {args.rate:g} msgs/s ({args.rate / args.batch:g} requests/s over "
              f"{args.producers} producers); latency counts from when a request was due")
    print(f"published: {r.published} msgs in {args.seconds:g} s = "
          f"{r.published / args.seconds:.1f} msgs/s ({args.batch} per request)")
    print(f"consumed and acked: {r.consumed} msgs = {r.consumed / args.seconds:.1f} msgs/s "
          f"in {r.consume_requests} consume requests")
    print(latency_line("publish request", r.publish_ms))
    killed = bench.killed_at
    if killed is not None:
        ends = sorted(end for _, end in r.publish_spans if end > killed)
        first = f"{ends[0] - killed:.3f} s" if ends else "never"
        # Publishes to the killed node's partitions wait until those move: the longest
        # request in flight across the kill is how long publishing stalled for them.
        stalled = [end - start for start, end in r.publish_spans if end > killed]
        print(f"after kill -9: first publish acknowledged in {first}; slowest publish in "
              f"flight after the kill took {max(stalled, default=float('nan')):.3f} s")
    if r.errors:
        print("errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())))
    else:
        print("errors: 0")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        cluster_box: list[Any] = []
        if args.url:
            urls = [u.strip().rstrip("/") for u in args.url.split(",") if u.strip()]
        else:
            cluster = stack.enter_context(local_cluster_handle(args.nodes, args.base_port))
            cluster_box.append(cluster)
            urls = [n.url for n in cluster.nodes]
        print(f"queue_bench: {args.producers} producers, {args.consumers} consumers over "
              f"{len(urls)} nodes, batch {args.batch}, {args.partitions} partitions, "
              f"{args.seconds:g} s after {args.warmup:g} s warmup", flush=True)

        def kill() -> None:
            if cluster_box:
                cluster_box[0].kill(1)

        bench = Bench(args, urls)
        run(bench.run(kill))
        report(args, bench)
    return 0 if bench.results.published > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
