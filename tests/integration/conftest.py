"""Real node processes on 127.0.0.1, each with its own embedded redis-server."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.cluster import LocalCluster, free_base_port, http_json
from service.config import REDIS_PORT_OFFSET

__all__ = ["REDIS_PORT_OFFSET", "free_base_port", "make_cluster", "raw_request",
           "running_cluster", "wait_until_cache_started"]


def make_cluster(tmp_path: Path, size: int = 3, **env: str) -> LocalCluster:
    return LocalCluster(
        size=size,
        base_port=free_base_port(size),
        data_root=tmp_path / "data",
        log_to_files=True,
        extra_env={"LOG_LEVEL": "INFO", **env},
    )


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A started 3-node cluster; parametrize it indirectly with a dict of settings."""
    c = make_cluster(tmp_path, **getattr(request, "param", {}))
    c.start()
    try:
        yield c
    finally:
        c.stop(timeout=10)
        c.kill_all()
        _dump_logs_on_failure(c)


@contextlib.contextmanager
def running_cluster(path: Path, **env: str) -> Iterator[LocalCluster]:
    """A started 3-node cluster with a leader, stopped (and killed if need be) after."""
    cluster = make_cluster(path, **env)
    cluster.start()
    try:
        cluster.wait_for_leader(30)
        yield cluster
    finally:
        cluster.stop(timeout=10)
        cluster.kill_all()


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One running 3-node cluster shared by a module's tests (starting one costs seconds);
    each test uses names of its own."""
    with running_cluster(Path(tmp_path_factory.mktemp("cluster"))) as cluster:
        yield cluster


def raw_request(url: str, method: str, data: bytes,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Send `data` as it is (malformed JSON included) and decode the JSON answer.
    Header values go out as latin-1 (http.client's rule): "\xff" is the byte 0xff."""
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_until_cache_started(c: LocalCluster, timeout: float = 20.0) -> None:
    """Until every node's cache has loaded (before that, cache routes answer 503)."""
    deadline = time.monotonic() + timeout
    while not all(http_json("GET", node.url + "/v1/cache", None, timeout=10)[0] == 200
                  for node in c.nodes):
        assert time.monotonic() < deadline, "the cache did not start on every node"
        time.sleep(0.1)


def _dump_logs_on_failure(c: LocalCluster) -> None:
    # Keep the tail of every node's log next to a failure report (pytest shows stdout
    # of failed tests only).
    for node in c.nodes:
        if node.log_path is not None and node.log_path.exists():
            lines = node.log_path.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {node.node_id} log tail ---")
            print("\n".join(lines))
