"""Random malformed and odd requests on every route of a running cluster: each gets an
answer within its timeout, and none is a 5xx other than 503 (which says "retry").

Seeded: a failure names the seed and the request, and `DSYNC_FUZZ_SEED=<seed>` replays
that seed alone. This found the lone-surrogate and deep-nesting 500s
(test_json_bodies_api.py).
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request

import pytest

from service.cluster import LocalCluster
from tests.integration.conftest import wait_until_cache_started

pytestmark = pytest.mark.slow

REQUESTS_PER_SEED = 400
SEEDS = [int(os.environ["DSYNC_FUZZ_SEED"])] if "DSYNC_FUZZ_SEED" in os.environ else [1, 2, 3]

ROUTES = [
    ("POST", "/v1/locks/{n}"), ("DELETE", "/v1/locks/{n}"), ("POST", "/v1/locks/{n}/keepalive"),
    ("GET", "/v1/locks/{n}"), ("GET", "/v1/locks"), ("POST", "/v1/locks/{n}/validate"),
    ("PUT", "/v1/queues/{n}"), ("POST", "/v1/queues/{n}/messages"),
    ("POST", "/v1/queues/{n}/consume"), ("POST", "/v1/queues/{n}/ack"),
    ("POST", "/v1/queues/{n}/nack"), ("GET", "/v1/queues/{n}"),
    ("GET", "/v1/queues/{n}/dead-letters"), ("GET", "/v1/cache/{n}"), ("PUT", "/v1/cache/{n}"),
    ("DELETE", "/v1/cache/{n}"), ("GET", "/v1/cache/{n}/lines"), ("GET", "/v1/cache"),
    ("POST", "/lock"), ("POST", "/unlock"), ("GET", "/locks"), ("POST", "/enqueue"),
    ("GET", "/queue"), ("POST", "/dequeue"), ("GET", "/health"), ("GET", "/v1/cluster"),
    ("GET", "/v1/kv/{n}"), ("PUT", "/v1/kv/{n}"), ("PATCH", "/v1/locks/{n}"),
]
FIELDS = ["owner", "mode", "ttl_ms", "wait_ms", "token", "resource", "body", "key", "id",
          "group", "consumer", "max", "visibility_ms", "receipts", "delay_ms", "value",
          "messages", "partitions", "replicas", "delivery_limit", "max_length", "request_id",
          "queue", "message"]
VALUES: list[object] = [
    None, True, False, 0, -1, 1, 2, 2**63, 2**70, -(2**70), 1.5, 1e308, "", "x", "exclusive",
    "shared", "a" * 300, "\u0000", "\ud800", [], [1], ["x"], {}, {"a": 1}, [{"body": 1}],
    ["0:1:1"], "0:1:1", "9999:1:1", "x" * 5000, [[[[["deep"]]]]],
]
NAMES = ["a", "x" * 257, "x" * 513, "%00", "%2F", "..", "a%20b", "%C3%BC", "%ff", "q" * 100,
         "_", "a:b", "*", "%C0%AF", "%ED%A0%80"]
QUERIES = ["", "?wait=1", "?max=-1", "?x=%ff", "?queue=%ED%A0%80", "?group=" + "g" * 300]


def random_body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.08:
        return b"{not json"
    if roll < 0.12:
        return b""
    if roll < 0.16:
        return b"\xff\xfe"
    if roll < 0.2:
        return json.dumps(rng.choice(VALUES)).encode()
    if roll < 0.24:
        return b"[" * 3000 + b"]" * 3000
    if roll < 0.28:  # a surrogate as raw bytes: not UTF-8, but json.loads takes it
        return b'{"' + rng.choice(FIELDS).encode() + b'": "\xed\xa0\x80"}'
    return json.dumps(
        {rng.choice(FIELDS): rng.choice(VALUES) for _ in range(rng.randint(0, 5))}
    ).encode()


# X-Request-Id values; http.client sends "\xff" as the byte 0xff, which is not UTF-8.
REQUEST_IDS = [None, None, None, "\xff\xfe", "a" * 200, "fuzz-id", " "]


def send(url: str, method: str, data: bytes, request_id: str | None) -> int:
    request = urllib.request.Request(url, data=data or None, method=method)
    request.add_header("Content-Type", "application/json")
    if request_id is not None:
        request.add_header("X-Request-Id", request_id)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_requests_never_get_a_500_or_hang(c: LocalCluster, seed: int) -> None:
    wait_until_cache_started(c)
    rng = random.Random(seed)
    for i in range(REQUESTS_PER_SEED):
        method, route = rng.choice(ROUTES)
        url = (c.nodes[rng.randrange(c.size)].url + route.replace("{n}", rng.choice(NAMES))
               + rng.choice(QUERIES))
        data = random_body(rng)
        request_id = rng.choice(REQUEST_IDS)
        try:
            status = send(url, method, data, request_id)
        except OSError as exc:  # a timeout or a dropped connection
            pytest.fail(f"seed {seed} request {i}: {method} {url} {data[:200]!r}: {exc!r}")
        assert status < 500 or status == 503, (
            f"seed {seed} request {i}: {method} {url} {data[:200]!r} "
            f"X-Request-Id {request_id!r} -> {status} "
            f"(replay: DSYNC_FUZZ_SEED={seed})"
        )
