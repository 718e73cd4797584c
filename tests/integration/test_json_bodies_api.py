"""Bodies Python's JSON decoder accepts but a node cannot carry (a lone UTF-16 surrogate,
nesting deep enough to reach the recursion limit) get 400 on every route that reads
JSON, not 500. Found by throwing random bodies at a running cluster."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from service.api.http import MAX_JSON_DEPTH
from service.cluster import LocalCluster
from tests.integration.conftest import raw_request, wait_until_cache_started

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def cache_ready(c: LocalCluster) -> None:
    wait_until_cache_started(c)


# (method, path, body template): "{x}" is replaced by the offending JSON value.
ROUTES = [
    ("POST", "/v1/locks/json-a", '{"owner": {x}}'),
    ("POST", "/v1/locks/json-a/keepalive", '{"owner": {x}, "token": 1}'),
    ("DELETE", "/v1/locks/json-a", '{"owner": {x}, "token": 1}'),
    ("POST", "/lock", '{"resource": {x}, "owner": "o"}'),
    ("POST", "/unlock", '{"resource": "r", "owner": {x}}'),
    ("POST", "/v1/queues/json-q/messages", '{"body": {x}}'),
    ("POST", "/enqueue", '{"queue": "json-q", "message": {x}}'),
    ("PUT", "/v1/cache/json-k", '{"value": {x}}'),
    ("PUT", "/v1/kv/json-k", '{"value": {x}}'),
]
LONE_SURROGATE = b'"a\\ud800b"'
# The same surrogate as raw bytes (ED A0 80): not UTF-8, though Python's json.loads of
# bytes decodes it ("surrogatepass") into the same unencodable str.
ENCODED_SURROGATE = b'"a\xed\xa0\x80b"'
TOO_DEEP = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
AT_RECURSION_LIMIT = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(("method", "path", "template"), ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("value",
                         [LONE_SURROGATE, ENCODED_SURROGATE, TOO_DEEP, AT_RECURSION_LIMIT],
                         ids=["lone-surrogate", "encoded-surrogate", "one-level-too-deep",
                              "5000-levels"])
def test_undecodable_bodies_are_400(c: LocalCluster, method: str, path: str, template: str,
                                    value: bytes) -> None:
    data = template.encode().replace(b"{x}", value)
    # Through every node: the Raft leader, a partition leader or home, and the nodes
    # that would forward the request.
    for node in range(c.size):
        status, reply = raw_request(c.nodes[node].url + path, method, data)
        assert (status, reply["error"]["code"]) == (400, "bad_json"), (node, reply)
        assert reply["error"]["message"]


def test_surrogate_pairs_and_the_deepest_allowed_value_are_accepted(c: LocalCluster) -> None:
    emoji = '"\\ud83d\\ude00"'
    status, reply = raw_request(c.nodes[1].url + "/v1/locks/json-ok", "POST",
                                f'{{"owner": {emoji}}}'.encode())
    assert status == 200 and reply["owner"] == "\U0001f600", reply
    deepest = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    status, reply = raw_request(c.nodes[1].url + "/v1/cache/json-ok", "PUT",
                                f'{{"value": {deepest}}}'.encode())
    assert status == 200, reply
    status, reply = raw_request(c.nodes[0].url + "/v1/cache/json-ok", "GET", b"")
    assert status == 200 and json.dumps(reply["value"]) == json.dumps(json.loads(deepest))


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/locks/rid-bytes", {"owner": "o"}),
    ("POST", "/lock", {"resource": "rid-bytes-seed", "owner": "o"}),
    ("PUT", "/v1/kv/rid-bytes", {"value": "v"}),
], ids=["lock", "seed-lock", "kv"])
def test_a_request_id_header_that_is_not_utf8_is_400(c: LocalCluster, method: str,
                                                     path: str, body: dict[str, Any]) -> None:
    for node in range(c.size):
        # "\xff" goes out as the byte 0xff, which is not UTF-8 (aiohttp hands it on
        # as a lone surrogate).
        status, reply = raw_request(c.nodes[node].url + path, method,
                                    json.dumps(body).encode(), {"X-Request-Id": "\xff\xfe-id"})
        assert (status, reply["error"]["code"]) == (400, "bad_request"), (node, reply)
        assert "X-Request-Id" in reply["error"]["message"]
    # The same request with a proper id goes through.
    status, reply = raw_request(c.nodes[0].url + path, method, json.dumps(body).encode(),
                                {"X-Request-Id": f"id-{uuid.uuid4().hex}"})
    assert status == 200, reply
