"""Real node processes on 127.0.0.1, each with its own embedded redis-server."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cluster import LocalCluster

REDIS_PORT_OFFSET = 1000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(size: int) -> int:
    """A base port whose node ports and their embedded Redis ports are all free."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 40_000)
        ports = [base + i for i in range(size)] + [
            base + i + REDIS_PORT_OFFSET for i in range(size)
        ]
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError("no free port range found on 127.0.0.1")


def make_cluster(tmp_path: Path, size: int = 3, **env: str) -> LocalCluster:
    return LocalCluster(
        size=size,
        base_port=free_base_port(size),
        data_root=tmp_path / "data",
        log_to_files=True,
        extra_env={"LOG_LEVEL": "INFO", **env},
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path)
    c.start()
    try:
        yield c
    finally:
        c.stop(timeout=10)
        c.kill_all()
        _dump_logs_on_failure(c)


def _dump_logs_on_failure(c: LocalCluster) -> None:
    # Keep the tail of every node's log next to a failure report (pytest shows stdout
    # of failed tests only).
    for node in c.nodes:
        if node.log_path is not None and node.log_path.exists():
            lines = node.log_path.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {node.node_id} log tail ---")
            print("\n".join(lines))
