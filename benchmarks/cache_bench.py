"""Cache throughput and latency: closed-loop asyncio clients reading and writing keys.

    python benchmarks/cache_bench.py --read-ratio 0.9 --keys 1000 --seconds 20
    python benchmarks/cache_bench.py --read-ratio 0.5 --keys 1000 --seconds 20
    python benchmarks/cache_bench.py --url http://127.0.0.1:8001,http://127.0.0.1:8002,...

Without --url it starts its own local cluster (real node processes with their own
redis-server, benchmarks/common.py's local_cluster) and stops it afterwards. Client i talks to
node i mod N, so every node's cache is used; each operation picks a key uniformly from
--keys and is a read with probability --read-ratio, else a write of a --value-bytes value.
All keys are written once before the measured window (--no-preload skips that).

Prints ops/s, the hit ratio of reads (the `hit` flag the API returns) and latency
percentiles separately for hits, misses and writes, and errors by code. Only operations
that finish inside the measured window (after --warmup) are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
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
    add_http_client_argument,
    latency_line,
    local_cluster,
    run,
)
from benchmarks.http_client import JsonClient, open_clients  # noqa: E402

MAX_OPS_PER_CLIENT = 50_000_000


@dataclass
class Results:
    hit_ms: list[float] = field(default_factory=list)
    miss_ms: list[float] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ops_per_node: Counter[int] = field(default_factory=Counter)

    @property
    def ops(self) -> int:
        return len(self.hit_ms) + len(self.miss_ms) + len(self.write_ms)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="size of the cluster to start")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured lead-in (s)")
    parser.add_argument("--read-ratio", type=float, default=0.9)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--no-preload", action="store_true", help="do not write every key first")
    parser.add_argument("--url", default=None, help="comma-separated node URLs of a cluster")
    parser.add_argument("--base-port", type=int, default=None, help="default: a free one")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request (s)")
    parser.add_argument("--seed", type=int, default=1)
    add_http_client_argument(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 4096:
        parser.error("--clients must be 1 to 4096")
    if not 0 < args.seconds <= 3600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 3600] and --warmup in [0, 60]")
    if not 0.0 <= args.read_ratio <= 1.0:
        parser.error("--read-ratio must be between 0 and 1")
    if not 1 <= args.keys <= 10_000_000 or not 0 <= args.value_bytes <= 200_000:
        parser.error("--keys must be 1 to 10^7 and --value-bytes 0 to 200000")
    if not 1 <= args.nodes <= 9:
        parser.error("--nodes must be 1 to 9")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, urls: list[str]) -> None:
        self.args = args
        self.urls = urls
        self.results = Results()
        self.run_id = uuid.uuid4().hex[:6]
        self.clients: list[JsonClient] = []
        self.window = (0.0, 0.0)

    def key(self, index: int) -> str:
        return f"bench-{self.run_id}-{index}"

    def in_window(self) -> bool:
        start, end = self.window
        return start <= time.monotonic() < end

    async def request(
        self, node: int, method: str, path: str, body: Any = None
    ) -> tuple[int, dict[str, Any], float]:
        """(status, JSON body, ms); status 0 when there was no answer."""
        status, parsed, seconds = await self.clients[node].request(
            method, path, body, self.args.timeout
        )
        return status, parsed, seconds * 1000

    def count_error(self, op: str, status: int, body: dict[str, Any]) -> None:
        if not self.in_window():
            return
        error = body.get("error")
        code = str(error.get("code")) if isinstance(error, dict) else f"http_{status}"
        self.results.errors[f"{op} {status} {code}" if status else f"{op} {code}"] += 1

    async def preload(self) -> None:
        queue = list(range(self.args.keys))
        value = "p" * self.args.value_bytes

        async def worker(w: int) -> None:
            while queue:
                i = queue.pop()
                status, body, _ = await self.request(
                    w % len(self.urls), "PUT", f"/v1/cache/{self.key(i)}", {"value": value}
                )
                if status != 200:
                    raise RuntimeError(f"preload of {self.key(i)} failed: {status} {body}")

        await asyncio.gather(*(worker(w) for w in range(min(32, self.args.keys))))

    async def client(self, cid: int) -> None:
        args = self.args
        node = cid % len(self.urls)
        rng = random.Random(args.seed * 100_003 + cid)
        value = "v" * args.value_bytes
        results = self.results
        for _ in range(MAX_OPS_PER_CLIENT):
            if time.monotonic() >= self.window[1]:
                return
            path = f"/v1/cache/{self.key(rng.randrange(args.keys))}"
            if rng.random() < args.read_ratio:
                status, body, ms = await self.request(node, "GET", path)
                if status == 200:
                    hit = body.get("hit") is True
                elif status == 404 and isinstance(body.get("error"), dict):
                    hit = body["error"].get("hit") is True
                else:
                    self.count_error("read", status, body)
                    await asyncio.sleep(0.01)
                    continue
                if self.in_window():
                    (results.hit_ms if hit else results.miss_ms).append(ms)
                    results.ops_per_node[node] += 1
            else:
                status, body, ms = await self.request(node, "PUT", path, {"value": value})
                if status != 200:
                    self.count_error("write", status, body)
                    await asyncio.sleep(0.01)
                    continue
                if self.in_window():
                    results.write_ms.append(ms)
                    results.ops_per_node[node] += 1

    async def run(self) -> Results:
        # One request in flight per closed-loop client; at least 32 for the preload.
        limit = max(32, -(-self.args.clients // len(self.urls)))
        self.clients = open_clients(self.args.http_client, self.urls, limit)
        try:
            if not self.args.no_preload:
                started = time.monotonic()
                await self.preload()
                print(f"preloaded {self.args.keys} keys in {time.monotonic() - started:.1f} s",
                      flush=True)  # fmt: skip
            now = time.monotonic()
            self.window = (now + self.args.warmup, now + self.args.warmup + self.args.seconds)
            tasks = [asyncio.create_task(self.client(c)) for c in range(self.args.clients)]
            grace = self.args.warmup + self.args.seconds + self.args.timeout * 2 + 10
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for client in self.clients:
                await client.close()
        return self.results


def report(args: argparse.Namespace, urls: list[str], results: Results) -> None:
    reads = len(results.hit_ms) + len(results.miss_ms)
    ratio = len(results.hit_ms) / reads if reads else float("nan")
    print(f"ops: {results.ops} in {args.seconds:g} s = {results.ops / args.seconds:.1f} ops/s "
          f"({reads} reads, {len(results.write_ms)} writes)")  # fmt: skip
    print(f"hit ratio (reads): {ratio:.3f}")
    print(latency_line("read hits  ", results.hit_ms))
    print(latency_line("read misses", results.miss_ms))
    print(latency_line("writes     ", results.write_ms))
    if results.errors:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(results.errors.items()))
        print(f"errors: {sum(results.errors.values())} ({errors})")
    else:
        print("errors: 0")
    spread = ", ".join(f"{urls[i]} {results.ops_per_node[i]}" for i in range(len(urls)))
    print(f"ops per node: {spread}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.url:
            urls = [u.strip().rstrip("/") for u in args.url.split(",") if u.strip()]
        else:
            urls = stack.enter_context(local_cluster(args.nodes, args.base_port))
            time.sleep(1.0)  # let every node's cache load its state
        print(
            f"cache_bench: {args.clients} clients over {len(urls)} nodes, read ratio "
            f"{args.read_ratio:g}, {args.keys} keys, {args.value_bytes}-byte values, "
            f"{args.seconds:g} s measured after {args.warmup:g} s warmup",
            flush=True,
        )
        results = run(Bench(args, urls).run())
        report(args, urls, results)
    return 0 if results.ops > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
