"""The Cache part of the REST contract, against three real node processes.

One cluster serves the module; each test uses keys of its own. Requests go to different
nodes on purpose: a client reading or writing through node X uses X's cache.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
import redis

from service.cache import wire
from service.cache.messages import PutM
from service.cluster import LocalCluster, http_json
from tests.integration.call_socket import send_call_frame
from tests.integration.conftest import (
    REDIS_PORT_OFFSET,
    raw_request,
    wait_until_cache_started,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def cache_ready(c: LocalCluster) -> None:
    """The shared cluster (conftest `c`) with its cache loaded on every node."""
    wait_until_cache_started(c)


def call(c: LocalCluster, node: int, method: str, path: str, body: Any = None,
         timeout: float = 10.0) -> tuple[int, Any]:  # fmt: skip
    return http_json(method, c.nodes[node % c.size].url + path, body, timeout=timeout)


def new_key() -> str:
    return f"key-{uuid.uuid4().hex[:10]}"


def path(key: str) -> str:
    return f"/v1/cache/{quote(key, safe='')}"


def test_read_your_write_through_every_node(c: LocalCluster) -> None:
    key = new_key()
    status, put = call(c, 0, "PUT", path(key), {"value": {"n": 1, "tags": ["a", "b"]}})
    assert status == 200 and put == {"key": key, "version": 1}
    for node in range(3):
        status, got = call(c, node, "GET", path(key))
        assert status == 200, got
        assert (got["key"], got["value"], got["version"]) == (key, {"n": 1, "tags": ["a", "b"]}, 1)
    status, put = call(c, 2, "PUT", path(key), {"value": "second"})
    assert status == 200 and put["version"] == 2
    for node in (1, 0, 2):
        status, got = call(c, node, "GET", path(key))
        assert (status, got["value"], got["version"]) == (200, "second", 2)


def test_a_write_invalidates_every_other_copy(c: LocalCluster) -> None:
    key = new_key()
    call(c, 0, "PUT", path(key), {"value": 1})
    for node in range(3):
        assert call(c, node, "GET", path(key))[0] == 200
    status, lines = call(c, 1, "GET", f"{path(key)}/lines")
    assert status == 200
    assert {n: v["state"] for n, v in lines["lines"].items()} == {
        "node1": "S", "node2": "S", "node3": "S"
    }  # fmt: skip
    assert lines["directory"]["state"] == "S"
    assert sorted(lines["directory"]["sharers"]) == ["node1", "node2", "node3"]

    assert call(c, 2, "PUT", path(key), {"value": 2})[0] == 200
    status, lines = call(c, 0, "GET", f"{path(key)}/lines")
    states = {n: v["state"] for n, v in lines["lines"].items()}
    assert states == {"node1": "I", "node2": "I", "node3": "M"}, lines
    assert lines["directory"]["state"] == "OWNED" and lines["directory"]["owner"] == "node3"
    assert lines["home"] in ("node1", "node2", "node3")


def test_the_second_local_read_is_a_hit(c: LocalCluster) -> None:
    key = new_key()
    call(c, 0, "PUT", path(key), {"value": "x"})
    first = call(c, 1, "GET", path(key))[1]
    second = call(c, 1, "GET", path(key))[1]
    assert (first["hit"], second["hit"]) == (False, True)
    assert second["state"] == "S" and second["value"] == "x"
    mine = call(c, 0, "GET", path(key))[1]
    assert mine["hit"] is True and mine["state"] in ("M", "S")


def test_delete_then_every_node_reads_404(c: LocalCluster) -> None:
    key = new_key()
    call(c, 1, "PUT", path(key), {"value": [1, 2, 3]})
    for node in range(3):
        call(c, node, "GET", path(key))
    status, deleted = call(c, 2, "DELETE", path(key))
    assert status == 200 and deleted == {"key": key, "deleted": True, "version": 2}
    for node in range(3):
        status, err = call(c, node, "GET", path(key))
        assert status == 404 and err["error"]["code"] == "not_found"
        assert err["error"]["version"] == 2
    status, put = call(c, 0, "PUT", path(key), {"value": "back"})
    assert (status, put["version"]) == (200, 3)


def test_an_unknown_key_is_404_and_null_is_a_value(c: LocalCluster) -> None:
    key = new_key()
    status, err = call(c, 2, "GET", path(key))
    assert status == 404 and err["error"]["code"] == "not_found"
    assert call(c, 0, "PUT", path(key), {"value": None})[0] == 200
    status, got = call(c, 1, "GET", path(key))
    assert (status, got["value"], got["version"]) == (200, None, 1)


def test_keys_may_hold_any_characters(c: LocalCluster) -> None:
    for key in ("with space", "ключ/🔑", "a*b?[c]", "k" * 512):
        status, put = call(c, 1, "PUT", path(key), {"value": key})
        assert status == 200, (key, put)
        status, got = call(c, 2, "GET", path(key))
        assert (status, got["key"], got["value"]) == (200, key, key)


def test_the_cache_and_metrics_report_hits_states_and_invalidations(c: LocalCluster) -> None:
    key = new_key()
    call(c, 0, "PUT", path(key), {"value": 1})
    call(c, 1, "GET", path(key))
    call(c, 1, "GET", path(key))
    call(c, 2, "PUT", path(key), {"value": 2})  # invalidates node2's copy (maybe node1's)
    status, info = call(c, 1, "GET", "/v1/cache")
    assert status == 200
    assert info["capacity"]["max_entries"] == 10_000
    assert info["capacity"]["max_value_bytes"] == 256 * 1024
    assert info["hits"] >= 1 and info["misses"] >= 1 and 0 < info["hit_ratio"] < 1
    assert set(info["states"]) == {"M", "E", "S", "I"}
    assert info["size"]["entries"] >= 1
    invalidations = sum(call(c, n, "GET", "/v1/cache")[1]["invalidations_sent"] for n in range(3))
    assert invalidations >= 1
    with urllib.request.urlopen(c.nodes[1].url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for series in ("dsync_cache_hits_total", "dsync_cache_misses_total",
                   "dsync_cache_invalidations_total", "dsync_cache_lines",
                   "dsync_cache_write_backs_total", "dsync_cache_evictions_total",
                   "dsync_cache_invalidation_seconds", "dsync_cache_mirror_in_step",
                   "dsync_cache_mirror_full_images"):  # fmt: skip
        assert series in text, series


def test_cluster_scope_reports_every_node_and_totals(c: LocalCluster) -> None:
    key = new_key()
    assert call(c, 0, "PUT", path(key), {"value": 1})[0] == 200
    for node in (1, 2):
        assert call(c, node, "GET", path(key))[0] == 200
    status, view = call(c, 2, "GET", "/v1/cache?scope=cluster")
    assert status == 200, view
    nodes, totals = view["nodes"], view["totals"]
    assert sorted(nodes) == sorted(n.node_id for n in c.nodes)
    assert totals["nodes_answering"] == c.size
    for field in ("hits", "misses", "write_backs", "evictions", "invalidations_sent"):
        assert totals[field] == sum(nodes[n][field] for n in nodes), field
    assert totals["entries"] == sum(nodes[n]["size"]["entries"] for n in nodes)
    assert totals["states"]["S"] == sum(nodes[n]["states"]["S"] for n in nodes)
    assert totals["entries"] >= 3  # the key is cached on every node now
    status, err = call(c, 0, "GET", "/v1/cache?scope=everything")
    assert (status, err["error"]["code"]) == (400, "bad_request")


def test_lines_and_directory_entries_are_mirrored_in_redis(c: LocalCluster) -> None:
    key = new_key()
    call(c, 0, "PUT", path(key), {"value": "mirrored"})
    lines = call(c, 0, "GET", f"{path(key)}/lines")[1]
    home = int(lines["home"].removeprefix("node")) - 1
    writer = redis.Redis(port=c.nodes[0].port + REDIS_PORT_OFFSET)
    line = writer.hgetall(f"dsync:cache:line:{key}")
    assert line[b"state"] == b"M" and line[b"value"] == b'"mirrored"' and line[b"version"] == b"1"
    entry = redis.Redis(port=c.nodes[home].port + REDIS_PORT_OFFSET).hgetall(
        f"dsync:cache:dir:{key}"
    )
    assert entry[b"state"] == b"O" and entry[b"owner"] == b"node1"


@pytest.mark.parametrize(
    ("method", "key", "body", "status", "code"),
    [
        ("PUT", "big", {"value": "x" * 300_000}, 413, "too_large"),
        ("PUT", "huge", {"value": "x" * 2_000_000}, 413, "too_large"),
        ("PUT", "k" * 513, {"value": 1}, 400, "bad_request"),
        ("GET", "k" * 513, None, 400, "bad_request"),
        ("DELETE", "é" * 257, None, 400, "bad_request"),
        ("PUT", "novalue", {"val": 1}, 400, "bad_request"),
        ("PUT", "novalue", {}, 400, "bad_request"),
        ("PUT", "extra", {"value": 1, "ttl": 5}, 400, "bad_request"),
        ("PUT", "list", [1, 2], 400, "bad_json"),
    ],
    ids=[
        "value-over-256KiB", "body-over-1MiB", "put-key-over-512-bytes",
        "get-key-over-512-bytes", "delete-key-over-512-utf8-bytes", "missing-value",
        "empty-object", "unknown-field", "not-an-object",
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_4xx(c: LocalCluster, method: str, key: str, body: Any,
                                  status: int, code: str) -> None:  # fmt: skip
    got, err = call(c, 1, method, path(key), body)
    assert (got, err["error"]["code"]) == (status, code), err
    assert err["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"{not json", "bad_json"), (b"", "bad_json"), (b'{"value": NaN}', "bad_request")],
    ids=["broken-json", "empty-body", "nan"],
)
def test_malformed_bodies_are_400(c: LocalCluster, raw: bytes, code: str) -> None:
    status, err = raw_request(c.nodes[0].url + "/v1/cache/malformed", "PUT", raw)
    assert (status, err["error"]["code"]) == (400, code), err


def test_internal_requests_are_not_bound_by_the_client_body_limit(c: LocalCluster) -> None:
    """A batch of protocol messages may carry several 256 KiB values: over the clients'
    1 MiB limit, it must still be accepted (a 413 would be retried forever)."""
    big = json.dumps("x" * 250_000)
    messages = [wire.encode(PutM(new_key(), "node2", 1, 1, big)) for _ in range(8)]
    assert len(msgpack.packb(messages)) > 1_500_000
    frame = msgpack.packb([1, [["cache.messages", {"m": messages}]]], use_bin_type=True)
    status, answers = send_call_frame(c.nodes[0].url, frame, {"X-Dsync-From": "node2"})
    assert (status, answers[0][0]) == (200, 200), answers
    status, _ = call(c, 0, "PUT", "/v1/cache/" + new_key(), {"value": "x" * 2_000_000})
    assert status == 413  # clients keep their limit
