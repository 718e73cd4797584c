"""What the benchmarks share: a local cluster to measure, time windows, percentiles.

Benchmarks only ever target 127.0.0.1: the cluster they start themselves, or the URLs a
user passes of a cluster on this machine. The nodes they start log at WARNING; set
BENCH_LOG_LEVEL=INFO to keep their full logs (in each node's data directory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from benchmarks.http_client import CLIENT_KINDS

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from service.cluster import LocalCluster

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when installed, as the nodes run: the load driver shares the
    machine's cores with the cluster it measures, so its own CPU cost matters."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@dataclass
class Window:
    start: float
    end: float

    def __contains__(self, moment: float) -> bool:
        return self.start <= moment < self.end


@dataclass(frozen=True)
class Schedule:
    """When one client of an open-loop load sends its requests: every `interval` seconds
    from `origin`. A client that falls behind sends at once and does not skip requests,
    and its latency counts from `due`, so a slow server cannot hide its queueing."""

    origin: float
    interval: float

    def due(self, n: int) -> float:
        return self.origin + n * self.interval

    @classmethod
    def spread(cls, start: float, requests_per_second: float, clients: int) -> list[Schedule]:
        """Schedules for `clients` that together offer `requests_per_second`, staggered
        evenly so their requests do not all fall due at once."""
        if requests_per_second <= 0 or clients < 1:
            raise ValueError("need a positive rate and at least one client")
        interval = clients / requests_per_second
        return [cls(start + i * interval / clients, interval) for i in range(clients)]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of values (sorted or not); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_line(label: str, values: list[float]) -> str:
    if not values:
        return f"{label}: no successful requests in the window"
    return (
        f"{label}: n={len(values)} p50 {percentile(values, 0.50):.1f} ms, "
        f"p90 {percentile(values, 0.90):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, "
        f"max {max(values):.1f} ms"
    )


@contextlib.contextmanager
def local_cluster(nodes: int, base_port: int | None) -> Iterator[list[str]]:
    """A fresh local cluster for the benchmark; yields its node URLs."""
    with local_cluster_handle(nodes, base_port) as cluster:
        yield [n.url for n in cluster.nodes]


@contextlib.contextmanager
def local_cluster_handle(
    nodes: int, base_port: int | None, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """The same, yielding the LocalCluster itself (for benchmarks that kill nodes or look
    into its Redis); `env`: settings for every node."""
    from service.cluster import LocalCluster, free_base_port

    data_root = Path(tempfile.mkdtemp(prefix="dsync-bench-"))
    cluster = LocalCluster(
        size=nodes,
        base_port=base_port if base_port is not None else free_base_port(nodes),
        data_root=data_root,
        log_to_files=True,
        extra_env={"LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"), **(env or {})},
    )
    started = time.monotonic()
    cluster.start()
    try:
        leader = cluster.wait_for_leader(timeout=60)
        print(
            f"started {nodes} nodes in {time.monotonic() - started:.1f} s "
            f"(leader {cluster.nodes[leader].node_id}); data in {data_root}",
            flush=True,
        )
        yield cluster
    finally:
        cluster.stop(timeout=10)
        for i in range(cluster.size):
            with contextlib.suppress(Exception):
                cluster.kill(i)
        shutil.rmtree(data_root, ignore_errors=True)


def add_http_client_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http-client",
        choices=CLIENT_KINDS,
        default="lean",
        help="the driver's HTTP client: lean (httptools, least CPU) or aiohttp "
        "(see benchmarks/http_client.py)",
    )
