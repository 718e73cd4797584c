"""The cache under kill -9 and restart, checked against its promises.

Client threads read, write and delete a few overlapping keys through all three nodes
while one node, then another, is killed -9 (with its Redis) and restarted. Every
operation is recorded with its start and end time and fed to
`service.cache.checker.HistoryChecker`, which reports any read older than the last write
acknowledged before it began, any two writes sharing a version, any value that differs
from what its version's write wrote, and any write acknowledged before another began
that got the larger version. An answer the client did not get (503, timeout, connection
refused) is "unknown", never a failure: it is not recorded. Then every node is killed
and restarted, and every key read through every node must give at least the last
acknowledged write.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import pytest

from service.cache.checker import HistoryChecker
from service.cache.values import encode
from service.cluster import LocalCluster, http_json

pytestmark = pytest.mark.slow

KEYS = [f"hot-{i}" for i in range(8)]
CLIENTS = 6
RUN_SECONDS = 14.0
OUTAGES = [(1, 3.0, 6.5), (2, 8.5, 10.5)]  # (node index, kill at, restart at) in seconds
TIMEOUT = 8.0  # above the service's own 5 s write bound


def now_us() -> int:
    return time.monotonic_ns() // 1_000


def call(c: LocalCluster, node: int, method: str, key: str, body: Any = None) -> tuple[int, Any]:
    try:
        return http_json(
            method, f"{c.nodes[node].url}/v1/cache/{quote(key, safe='')}", body, timeout=TIMEOUT
        )
    except (OSError, ValueError):
        return 0, {}


class History:
    def __init__(self) -> None:
        self.checker = HistoryChecker()
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.last_write: dict[str, tuple[int, int, str | None]] = {}  # key -> (end, version, text)

    def record(self, kind: str, node: int, key: str, text: str | None, version: int,
               start: int, end: int) -> None:  # fmt: skip
        name = f"node{node + 1}"
        with self.lock:
            if kind == "read":
                self.checker.record_read(name, key, text, version, start, end)
            else:
                self.checker.record_write(name, key, text, version, start, end)
                last = self.last_write.get(key)
                if last is None or end > last[0]:
                    self.last_write[key] = (end, version, text)
            self.outcomes[kind] += 1


def client(c: LocalCluster, index: int, stop_at: float, history: History) -> None:
    rng = random.Random(index)
    sequence = 0
    while time.monotonic() < stop_at:
        node = rng.randrange(c.size)
        key = rng.choice(KEYS)
        roll = rng.random()
        start = now_us()
        if roll < 0.6:
            status, body = call(c, node, "GET", key)
            end = now_us()
            if status == 200:
                history.record("read", node, key, encode(body["value"]), body["version"],
                               start, end)  # fmt: skip
            elif status == 404:
                history.record("read", node, key, None, body["error"]["version"], start, end)
            else:
                unknown(history, "read", status, body)
            continue
        sequence += 1
        if roll < 0.95:
            value: Any = {"client": index, "n": sequence}
            status, body = call(c, node, "PUT", key, {"value": value})
            text: str | None = encode(value)
        else:
            status, body = call(c, node, "DELETE", key)
            text = None
        end = now_us()
        if status == 200:
            history.record("write", node, key, text, body["version"], start, end)
        else:
            unknown(history, "write", status, body)


def unknown(history: History, kind: str, status: int, body: Any) -> None:
    with history.lock:
        if status in (0, 503):
            history.outcomes[f"{kind} unknown ({status})"] += 1
            return
        history.errors.append(f"{kind}: {status} {body}")  # anything else is a bug
    time.sleep(0.01)


def wait_ready(c: LocalCluster, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = 0
        for i in range(c.size):
            with contextlib.suppress(OSError, ValueError):
                ready += http_json("GET", c.nodes[i].url + "/v1/cache", timeout=2)[0] == 200
        if ready == c.size:
            return
        time.sleep(0.1)
    raise AssertionError("the cache did not come back on every node")


@pytest.mark.parametrize(
    "cluster",
    [{}, {"CACHE_MAX_ENTRIES": "3"}],
    ids=["default-capacity", "3-lines"],  # 3 lines for 8 keys: constant evictions, and
    indirect=True,  # deleted keys nobody holds any more are retired by their homes
)
def test_no_stale_reads_under_kill_9_and_restart(cluster: LocalCluster) -> None:
    cluster.wait_for_leader(30)
    wait_ready(cluster)
    history = History()
    started = time.monotonic()
    stop_at = started + RUN_SECONDS
    threads = [
        threading.Thread(target=client, args=(cluster, i, stop_at, history), daemon=True)
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for victim, kill_at, restart_at in OUTAGES:
        time.sleep(max(0.0, started + kill_at - time.monotonic()))
        cluster.kill(victim)
        time.sleep(max(0.0, started + restart_at - time.monotonic()))
        cluster.start(victim)
    for t in threads:
        t.join(RUN_SECONDS + 3 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a client hung"
    outages = ", ".join(f"node{v + 1} down +{k:g}..+{r:g} s" for v, k, r in OUTAGES)
    retired = retired_entries(cluster)
    print(f"outcomes: {dict(history.outcomes)}; {outages}; entries retired: {retired}")
    assert not history.errors, history.errors[:5]
    assert history.outcomes["write"] > 50 and history.outcomes["read"] > 100
    if "CACHE_MAX_ENTRIES" in cluster.extra_env:
        assert retired > 0, "no directory entry was retired: the variant tests nothing new"
    history.checker.assert_ok("during the run")

    # Every node killed -9 at once, then restarted: acknowledged writes are all there.
    cluster.kill_all()
    cluster.start()
    cluster.wait_for_leader(30)
    wait_ready(cluster)
    assert read_back(cluster, history) == len(KEYS) * cluster.size
    history.checker.assert_ok("after restarting every node")


def retired_entries(c: LocalCluster) -> int:
    """Directory entries the homes retired (since their last start)."""
    total = 0
    for node in c.nodes:
        with contextlib.suppress(OSError, ValueError):
            status, view = http_json("GET", node.url + "/v1/cache", timeout=2)
            total += view["directory"]["retired"] if status == 200 else 0
    return total


def read_back(c: LocalCluster, history: History) -> int:
    """Read every key through every node (retrying 503s for up to 20 s each) into the
    history; each must be at least as new as its last acknowledged write. Returns how
    many reads were made."""
    checked = 0
    for key in KEYS:
        for node in range(c.size):
            deadline = time.monotonic() + 20
            while True:
                start = now_us()
                status, body = call(c, node, "GET", key)
                end = now_us()
                if status in (200, 404) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status in (200, 404), f"{key} through node{node + 1}: {status} {body}"
            if status == 200:
                version, text = body["version"], encode(body["value"])
            else:
                version, text = body["error"]["version"], None
            history.record("read", node, key, text, version, start, end)
            last = history.last_write.get(key)
            if last is not None:
                assert version >= last[1], f"{key} via node{node + 1}: v{version} < v{last[1]}"
            checked += 1
    return checked
