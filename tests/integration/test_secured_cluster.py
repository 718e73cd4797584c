"""A cluster run with CLUSTER_SECRET: every node-to-node path (Raft, batched calls,
queue RPCs, cache messages) carries it, and a request without it is refused.

Every service is driven through a follower, so each request crosses at least one
node-to-node hop that must authenticate.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cluster import LocalCluster, http_json
from service.transport.calls import CALLS_PATH
from service.transport.http import RAFT_PATH
from tests.integration.conftest import running_cluster, wait_until_cache_started

pytestmark = pytest.mark.slow

SECRET = "integration-test-secret"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(Path(tmp_path_factory.mktemp("secured")), CLUSTER_SECRET=SECRET) as c:
        yield c


def _follower(c: LocalCluster) -> str:
    leader = c.wait_for_leader(10)
    return c.nodes[(leader + 1) % c.size].url


def test_locks_through_a_follower(secured: LocalCluster) -> None:
    url = _follower(secured)
    status, grant = http_json("POST", url + "/v1/locks/sec-lock", {"owner": "a"}, timeout=10)
    assert status == 200, grant
    status, body = http_json(
        "DELETE", url + "/v1/locks/sec-lock", {"owner": "a", "token": grant["token"]},
        timeout=10,
    )
    assert (status, body) == (200, {"released": True})


def test_queue_through_a_follower(secured: LocalCluster) -> None:
    url = _follower(secured)
    for i in range(8):  # keyless: spread over partitions led by every node
        status, body = http_json(
            "POST", url + "/v1/queues/sec-q/messages", {"body": i, "id": f"m{i}"}, timeout=10
        )
        assert status == 201, body
    got: list[int] = []
    for _ in range(20):
        if len(got) >= 8:
            break
        status, body = http_json(
            "POST", url + "/v1/queues/sec-q/consume",
            {"consumer": "c", "max": 8, "wait_ms": 500}, timeout=10,
        )  # fmt: skip
        assert status == 200, body
        got += [m["body"] for m in body["messages"]]
        receipts = [m["receipt"] for m in body["messages"]]
        if receipts:
            assert http_json(
                "POST", url + "/v1/queues/sec-q/ack", {"receipts": receipts}, timeout=10
            )[0] == 200
    assert sorted(got) == list(range(8))


def test_cache_across_nodes(secured: LocalCluster) -> None:
    # Run alone (-k cache), this test can come before a cache has finished starting.
    wait_until_cache_started(secured)
    first, second = secured.nodes[0].url, secured.nodes[1].url
    status, body = http_json("PUT", first + "/v1/cache/sec-key", {"value": "v1"}, timeout=10)
    assert status == 200, body
    status, body = http_json("GET", second + "/v1/cache/sec-key", timeout=10)
    assert (status, body.get("value")) == (200, "v1"), body


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", CALLS_PATH), ("POST", RAFT_PATH), ("POST", "/internal/v1/cache/describe")],
)
def test_node_to_node_routes_refuse_a_request_without_the_secret(
    secured: LocalCluster, method: str, path: str
) -> None:
    # A GET is a call socket's opening handshake: refused before it is upgraded.
    request = urllib.request.Request(
        secured.nodes[0].url + path, data=b"\x90" if method == "POST" else None,
        method=method, headers={"Content-Type": "application/x-msgpack"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 401
