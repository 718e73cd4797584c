"""Key churn through real node processes: what a node keeps for keys that come and go.

Each node's cache holds 20 lines, and clients write, read (through another node) and
delete hundreds of distinct keys, and read keys that never existed. Afterwards a node
may hold state only for keys that are cached somewhere or have a value: its directory,
its txn floors and its Redis stay bounded by the caches' capacity, not by how many
distinct keys ever passed (before, each left about 1.2 KB per node for good). A retired
key still reads as absent, and comes back with versions above the ones it had.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from service.cluster import LocalCluster, http_json
from tests.integration.conftest import (
    REDIS_PORT_OFFSET,
    running_cluster,
    wait_until_cache_started,
)

pytestmark = pytest.mark.slow

CAPACITY = 20  # lines per node
KEYS = 300  # distinct keys written, read and deleted
ABSENT = 100  # distinct keys only ever read (never written)


def call(c: LocalCluster, node: int, method: str, key: str, body: Any = None) -> tuple[int, Any]:
    url = c.nodes[node % c.size].url + f"/v1/cache/{quote(key, safe='')}"
    return http_json(method, url, body, timeout=10.0)


def cache_keys_in_redis(c: LocalCluster, node: int) -> list[str]:
    r = redis.Redis(port=c.nodes[node].port + REDIS_PORT_OFFSET, decode_responses=True)
    return [k for k in r.scan_iter("dsync:cache:*", count=1_000) if not k.endswith("incarnation")]


def test_churning_keys_leaves_state_bounded_by_capacity(tmp_path: Path) -> None:
    with running_cluster(tmp_path, CACHE_MAX_ENTRIES=str(CAPACITY)) as c:
        wait_until_cache_started(c)
        deleted_at: dict[str, int] = {}
        for i in range(KEYS):
            key = f"churn-{i}"
            status, put = call(c, i, "PUT", key, {"value": "x" * 100})
            assert status == 200, put
            status, got = call(c, i + 1, "GET", key)
            assert (status, got["value"]) == (200, "x" * 100), got
            status, gone = call(c, i, "DELETE", key)
            assert status == 200 and gone["deleted"], gone
            deleted_at[key] = gone["version"]
        for i in range(ABSENT):
            status, got = call(c, i, "GET", f"never-{i}")
            assert status == 404, got

        # Push every line of the churned keys out of the caches with a few live keys.
        for i in range(3 * CAPACITY):
            assert call(c, i, "PUT", f"live-{i}", {"value": i})[0] == 200

        view: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, view = http_json("GET", c.nodes[0].url + "/v1/cache?scope=cluster")
            assert status == 200, view
            nodes = view["nodes"].values()
            if all(n["directory"]["entries"] <= 3 * CAPACITY + 3 * 3 for n in nodes):
                break
            time.sleep(0.2)
        nodes = list(view["nodes"].values())
        # Every key cached anywhere has at most one entry at its home: 3 caches of 20.
        assert sum(n["directory"]["entries"] for n in nodes) <= 3 * CAPACITY, view
        assert sum(n["directory"]["retired"] for n in nodes) >= KEYS + ABSENT, view
        assert all(n["txn_floors"] == 0 for n in nodes), view
        for node in range(c.size):
            # Its lines (E/M only), its directory entries, the retired floor, mirrors.
            held = cache_keys_in_redis(c, node)
            assert len(held) <= 2 * CAPACITY + 3 * CAPACITY + 1 + 2, held
            assert not [k for k in held if "churn-" in k or "never-" in k], held

        # A retired key still reads as absent everywhere, and comes back newer.
        for node in range(c.size):
            assert call(c, node, "GET", "churn-7")[0] == 404
        status, put = call(c, 2, "PUT", "churn-7", {"value": "back"})
        assert status == 200 and put["version"] > deleted_at["churn-7"], put
        for node in range(c.size):
            status, got = call(c, node, "GET", "churn-7")
            assert (status, got["value"], got["version"]) == (200, "back", put["version"])
