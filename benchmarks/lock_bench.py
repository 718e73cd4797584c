"""Lock throughput and latency: closed-loop asyncio clients doing acquire+release cycles.

    python benchmarks/lock_bench.py --nodes 3 --clients 64 --seconds 20 --mode uncontended
    python benchmarks/lock_bench.py --mode contended --names 4 --wait-ms 10000
    python benchmarks/lock_bench.py --url http://127.0.0.1:8001,http://127.0.0.1:8002,...
    python benchmarks/lock_bench.py --rate 1200    # an offered load instead of a closed loop

Without --url it starts its own local cluster (service.cluster.LocalCluster, real node
processes with their own redis-server, on a free base port on 127.0.0.1, data in a
temporary directory) and stops it afterwards. Clients are spread over all nodes (client i
talks to node i mod N) over kept-alive connections, one per client (--http-client picks
the HTTP client; benchmarks/http_client.py).

- uncontended: every client has its own lock name; try-lock (wait_ms 0).
- contended:   all clients share --names names and wait for them (wait_ms); the acquire
               latency then includes the time spent queued.

Prints cycles/s (a cycle is an acquire and its release, both answered 200), acquire and
release latency percentiles, and error counts by code. Only operations that finish inside
the measured window (after --warmup) are counted. With --rate the clients start cycles on
a fixed schedule (benchmarks/common.py Schedule) and the acquire latency counts from when
a cycle was due, so a client that fell behind shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import urllib.request
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
    local_cluster,
    run,
)
from benchmarks.http_client import JsonClient, open_clients  # noqa: E402

MAX_CYCLES_PER_CLIENT = 10_000_000
MAX_SECONDS = 3600.0


@dataclass
class Results:
    acquire_ms: list[float] = field(default_factory=list)
    release_ms: list[float] = field(default_factory=list)
    cycles: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cycles_per_node: Counter[int] = field(default_factory=Counter)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="size of the cluster to start")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured lead-in (s)")
    parser.add_argument("--mode", choices=["uncontended", "contended"], default="uncontended")
    parser.add_argument("--names", type=int, default=4, help="lock names when contended")
    parser.add_argument("--wait-ms", type=int, default=10_000, help="wait_ms when contended")
    parser.add_argument("--ttl-ms", type=int, default=30_000)
    parser.add_argument(
        "--no-request-id",
        action="store_true",
        help="send no request_id (skips the server's exactly-once table)",
    )
    parser.add_argument(
        "--url", default=None, help="comma-separated node URLs of a running cluster"
    )
    parser.add_argument("--base-port", type=int, default=None, help="default: a free one")
    parser.add_argument(
        "--leader-only",
        action="store_true",
        help="send every request to the leader (measures what forwarding costs)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per request (s)")
    parser.add_argument(
        "--rate", type=float, default=None,
        help="offered load in cycles/s over all clients (default: closed loop); acquire "
        "latency then counts from when the cycle was due",
    )
    add_http_client_argument(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 4096:
        parser.error("--clients must be 1 to 4096")
    if not 0 < args.seconds <= MAX_SECONDS or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 3600] and --warmup in [0, 60]")
    if not 1 <= args.nodes <= 9:
        parser.error("--nodes must be 1 to 9")
    if args.names < 1:
        parser.error("--names must be at least 1")
    if args.rate is not None and not 0 < args.rate <= 1_000_000:
        parser.error("--rate must be in (0, 1000000] cycles/s")
    return args


# --- the load ------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, urls: list[str]) -> None:
        self.args = args
        self.urls = urls
        self.results = Results()
        self.run_id = uuid.uuid4().hex[:8]
        self.clients: list[JsonClient] = []
        self.window = Window(0.0, 0.0)
        self.stop_at = 0.0
        self.schedules: list[Schedule | None] = [None] * args.clients

    async def request(
        self, node: int, method: str, path: str, body: dict[str, Any], timeout: float
    ) -> tuple[int, dict[str, Any], float]:
        """(status, JSON body, seconds); status 0 when there was no answer."""
        return await self.clients[node].request(method, path, body, timeout)

    def count_error(self, op: str, status: int, body: dict[str, Any]) -> None:
        if time.monotonic() not in self.window:
            return
        error = body.get("error")
        code = str(error.get("code")) if isinstance(error, dict) else f"http_{status}"
        self.results.errors[f"{op} {status} {code}" if status else f"{op} {code}"] += 1

    async def client(self, cid: int) -> None:
        args = self.args
        node = cid % len(self.urls)
        rng = random.Random(cid)
        owner = f"bench-{self.run_id}-c{cid}"
        own_name = f"bench-{self.run_id}-{cid}"
        contended = args.mode == "contended"
        wait_ms = args.wait_ms if contended else 0
        timeout = args.timeout + wait_ms / 1000
        schedule = self.schedules[cid]
        for n in range(MAX_CYCLES_PER_CLIENT):
            due = schedule.due(n) if schedule is not None else time.monotonic()
            if due >= self.stop_at:
                return
            if due > time.monotonic():  # a client behind schedule goes at once
                await asyncio.sleep(due - time.monotonic())
            name = (
                f"bench-{self.run_id}-shared-{rng.randrange(args.names)}" if contended else own_name
            )
            body: dict[str, Any] = {
                "owner": owner,
                "mode": "exclusive",
                "ttl_ms": args.ttl_ms,
                "wait_ms": wait_ms,
            }
            if not args.no_request_id:
                body["request_id"] = uuid.uuid4().hex
            status, reply, seconds = await self.request(
                node, "POST", f"/v1/locks/{name}", body, timeout
            )
            measured = time.monotonic() in self.window
            if status != 200:
                self.count_error("acquire", status, reply)
                await asyncio.sleep(0.01 if status in (0, 429, 503) else 0.001)
                continue
            if schedule is not None:
                seconds = time.monotonic() - due  # the wait for a late start counts too
            if measured:
                self.results.acquire_ms.append(seconds * 1000)
            release: dict[str, Any] = {"owner": owner, "token": reply.get("token")}
            if not args.no_request_id:
                release["request_id"] = uuid.uuid4().hex
            status, reply, seconds = await self.request(
                node, "DELETE", f"/v1/locks/{name}", release, args.timeout
            )
            if status != 200:
                self.count_error("release", status, reply)
                await asyncio.sleep(0.01 if status in (0, 429, 503) else 0.001)
                continue
            if time.monotonic() in self.window:
                self.results.release_ms.append(seconds * 1000)
                if measured:
                    self.results.cycles += 1
                    self.results.cycles_per_node[node] += 1

    async def run(self) -> Results:
        # Each closed-loop client has one request in flight, on its own node.
        limit = -(-self.args.clients // len(self.urls))
        self.clients = open_clients(self.args.http_client, self.urls, limit)
        try:
            now = time.monotonic()
            self.window = Window(now + self.args.warmup, now + self.args.warmup + self.args.seconds)
            self.stop_at = self.window.end
            if self.args.rate is not None:
                self.schedules = [*Schedule.spread(now, self.args.rate, self.args.clients)]
            tasks = [asyncio.create_task(self.client(c)) for c in range(self.args.clients)]
            grace = self.args.warmup + self.args.seconds + self.args.timeout * 2 + 10
            grace += self.args.wait_ms / 1000 if self.args.mode == "contended" else 0
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for client in self.clients:
                await client.close()
        return self.results


# --- reporting -----------------------------------------------------------------------


def report(args: argparse.Namespace, urls: list[str], results: Results) -> None:
    if args.rate is not None:
        print(f"offered: {args.rate:g} cycles/s over {args.clients} clients; acquire latency "
              "counts from when a cycle was due")
    rate = results.cycles / args.seconds
    print(f"cycles: {results.cycles} in {args.seconds:g} s = {rate:.1f} cycles/s", flush=True)
    print(latency_line("acquire", results.acquire_ms))
    print(latency_line("release", results.release_ms))
    if results.errors:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(results.errors.items()))
        print(f"errors: {sum(results.errors.values())} ({errors})")
    else:
        print("errors: 0")
    spread = ", ".join(f"{urls[i]} {results.cycles_per_node[i]}" for i in range(len(urls)))
    print(f"cycles per node: {spread}", flush=True)


def find_leader(urls: list[str]) -> str | None:
    """The URL of the node whose GET /health says it leads."""
    for url in urls:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                health = json.loads(response.read())
        except (OSError, ValueError):
            continue
        if isinstance(health, dict) and health.get("role") == "leader":
            return url
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.url:
            urls = [u.strip().rstrip("/") for u in args.url.split(",") if u.strip()]
        else:
            urls = stack.enter_context(local_cluster(args.nodes, args.base_port))
        if args.leader_only:
            leader = find_leader(urls)
            if leader is None:
                print("no node reports itself leader", file=sys.stderr)
                return 1
            urls = [leader]
        extra = f", {args.names} names, wait_ms {args.wait_ms}" if args.mode == "contended" else ""
        print(
            f"lock_bench: mode {args.mode}{extra}, {args.clients} clients over "
            f"{len(urls)} nodes, {args.seconds:g} s measured after {args.warmup:g} s warmup, "
            f"request ids {'off' if args.no_request_id else 'on'}"
            + (", leader only" if args.leader_only else ""),
            flush=True,
        )
        results = run(Bench(args, urls).run())
        report(args, urls, results)
    return 0 if results.cycles > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
