"""The Queues part of the REST contract, against three real node processes.

One cluster serves the module; each test uses queues of its own. Requests go to
different nodes on purpose: every node serves every queue.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
import redis

from service.cluster import LocalCluster, http_json
from service.placement import partition_for
from tests.integration.conftest import REDIS_PORT_OFFSET

pytestmark = pytest.mark.slow


def call(c: LocalCluster, node: int, method: str, path: str, body: Any = None,
         timeout: float = 10.0) -> tuple[int, Any]:
    return http_json(method, c.nodes[node % c.size].url + path, body, timeout=timeout)


def new_queue(c: LocalCluster, **options: Any) -> str:
    name = f"q-{uuid.uuid4().hex[:8]}"
    status, body = call(c, 0, "PUT", f"/v1/queues/{name}", options)
    assert status == 201, body
    return name


def consume(c: LocalCluster, node: int, queue: str, **opts: Any) -> list[dict[str, Any]]:
    body = {"consumer": "t", **opts}
    status, reply = call(c, node, "POST", f"/v1/queues/{queue}/consume", body)
    assert status == 200, reply
    return list(reply["messages"])


def drain(c: LocalCluster, queue: str, expected: int, timeout: float = 10) -> list[dict]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = consume(c, len(got), queue, max=100, wait_ms=200)
        got.extend(batch)
    return got


def test_publish_consume_ack_through_every_node(c: LocalCluster) -> None:
    q = new_queue(c, partitions=4)
    status, one = call(c, 1, "POST", f"/v1/queues/{q}/messages", {"body": {"n": 0}})
    assert status == 201 and set(one) >= {"id", "partition"}
    batch = {"messages": [{"body": {"n": i}} for i in range(1, 10)]}
    status, many = call(c, 2, "POST", f"/v1/queues/{q}/messages", batch)
    assert status == 201 and len(many) == 9
    got = drain(c, q, 10)
    assert sorted(m["body"]["n"] for m in got) == list(range(10))
    assert all(m["delivery_count"] == 1 for m in got)
    status, acked = call(c, 0, "POST", f"/v1/queues/{q}/ack",
                         {"receipts": [m["receipt"] for m in got]})
    assert status == 200 and acked["acked"] == 10
    assert consume(c, 1, q, max=100) == []
    status, info = call(c, 2, "GET", f"/v1/queues/{q}")
    assert status == 200 and len(info["partitions"]) == 4
    for part in info["partitions"]:
        assert {"owner", "replicas", "epoch", "length", "pending", "lag"} <= set(part)
        assert part["pending"] == 0 and part["lag"].get("default", 0) == 0


def test_unacked_message_is_redelivered_after_visibility(c: LocalCluster) -> None:
    q = new_queue(c, partitions=1)
    call(c, 0, "POST", f"/v1/queues/{q}/messages", {"body": "again"})
    first = consume(c, 1, q, visibility_ms=300)
    assert [m["delivery_count"] for m in first] == [1]
    assert consume(c, 2, q) == []  # invisible meanwhile
    time.sleep(0.4)
    second = consume(c, 0, q)
    assert [m["delivery_count"] for m in second] == [2]
    assert second[0]["id"] == first[0]["id"] and second[0]["receipt"] != first[0]["receipt"]
    # The first receipt is stale now: it must not ack the delivery someone else holds.
    status, stale = call(c, 1, "POST", f"/v1/queues/{q}/ack", {"receipts": [first[0]["receipt"]]})
    assert (status, stale) == (200, {"acked": 0, "results": ["not_pending"]})
    status, fresh = call(c, 2, "POST", f"/v1/queues/{q}/ack", {"receipts": [second[0]["receipt"]]})
    assert (status, fresh) == (200, {"acked": 1, "results": ["acked"]})


def test_nack_with_delay_and_dead_letters(c: LocalCluster) -> None:
    q = new_queue(c, partitions=1, delivery_limit=2)
    call(c, 0, "POST", f"/v1/queues/{q}/messages", {"body": "poison", "id": "p1"})
    for expected_count in (1, 2):
        got = consume(c, 1, q)
        assert [m["delivery_count"] for m in got] == [expected_count]
        status, reply = call(c, 2, "POST", f"/v1/queues/{q}/nack",
                             {"receipts": [got[0]["receipt"]], "delay_ms": 200})
        assert status == 200 and reply["nacked"] == 1
        assert consume(c, 0, q) == []  # delayed
        time.sleep(0.25)
    assert consume(c, 1, q) == []  # past the limit: moved, not delivered
    status, dead = call(c, 2, "GET", f"/v1/queues/{q}/dead-letters")
    assert status == 200
    assert [(m["id"], m["body"], m["delivery_count"]) for m in dead["messages"]] == [
        ("p1", "poison", 2)
    ]
    status, info = call(c, 0, "GET", f"/v1/queues/{q}")
    assert info["dead_letters"] == 1


def test_messages_of_one_key_are_delivered_in_order_one_at_a_time(c: LocalCluster) -> None:
    q = new_queue(c, partitions=2)
    for i in range(3):
        call(c, i, "POST", f"/v1/queues/{q}/messages", {"body": i, "key": "order-7"})
    seen = []
    for _ in range(3):
        got = consume(c, 0, q, max=10)
        assert len(got) == 1, got  # the next one waits until this one is acked
        seen.append(got[0]["body"])
        call(c, 1, "POST", f"/v1/queues/{q}/ack", {"receipts": [got[0]["receipt"]]})
    assert seen == [0, 1, 2]


def test_a_long_poll_through_a_node_that_leads_nothing_hears_of_a_message_at_once(
    c: LocalCluster,
) -> None:
    """A node with consumers waiting keeps a watch open at each partition leader, and
    the leader answers it when messages arrive (consumers no longer ask every leader
    every 0.5 s each): the message must reach the consumer well before the long poll's
    next look of its own (2 s)."""
    q = new_queue(c, partitions=1)
    owner = call(c, 0, "GET", f"/v1/queues/{q}")[1]["partitions"][0]["owner"]
    leader = next(i for i, node in enumerate(c.nodes) if node.node_id == owner)
    result: dict[str, Any] = {}

    def poll() -> None:
        body = {"consumer": "w", "wait_ms": 8_000}
        result["answer"] = call(c, leader + 1, "POST", f"/v1/queues/{q}/consume", body, 15)
        result["at"] = time.monotonic()

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.3)  # it looked, found nothing and waits
    sent = time.monotonic()
    assert call(c, leader, "POST", f"/v1/queues/{q}/messages", {"body": "late"})[0] == 201
    waiter.join(15)
    print(f"answered {result['at'] - sent:.3f} s after the publish")
    status, reply = result["answer"]
    assert status == 200 and [m["body"] for m in reply["messages"]] == ["late"], reply
    assert result["at"] - sent < 1.0, f"heard of it after {result['at'] - sent:.2f} s"


def test_messages_handed_to_a_long_poll_whose_client_hung_up_go_to_another_at_once(
    c: LocalCluster,
) -> None:
    """The long poll that waited longest is woken for a new message; its client has
    gone (it hung up while waiting), so nobody will see the message: it is handed back
    and the next consumer gets it now, not when its 60 s visibility ends."""
    q = new_queue(c, partitions=1)
    owner = call(c, 0, "GET", f"/v1/queues/{q}")[1]["partitions"][0]["owner"]
    leader = next(i for i, node in enumerate(c.nodes) if node.node_id == owner)
    payload = json.dumps({"consumer": "gone", "wait_ms": 8_000,
                          "visibility_ms": 60_000}).encode()  # fmt: skip
    head = (f"POST /v1/queues/{q}/consume HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", c.nodes[leader].port), timeout=5) as s:
        s.sendall(head.encode() + payload)
        time.sleep(0.5)  # it waits
    time.sleep(0.2)
    assert call(c, leader, "POST", f"/v1/queues/{q}/messages", {"body": "once"})[0] == 201
    got = consume(c, leader, q, wait_ms=3_000)
    assert [(m["body"], m["delivery_count"]) for m in got] == [("once", 2)], got


def test_publish_with_an_id_is_stored_once(c: LocalCluster) -> None:
    q = new_queue(c, partitions=4)
    first = call(c, 0, "POST", f"/v1/queues/{q}/messages", {"body": 1, "id": "once"})
    again = call(c, 1, "POST", f"/v1/queues/{q}/messages", {"body": 1, "id": "once"})
    assert first[0] == again[0] == 201
    assert again[1]["duplicate"] is True and again[1]["partition"] == first[1]["partition"]
    assert len(drain(c, q, 2, timeout=1.5)) == 1


def test_a_keyless_batch_goes_to_one_partition_and_a_re_sent_one_is_stored_once(
    c: LocalCluster,
) -> None:
    q = new_queue(c, partitions=8)
    path = f"/v1/queues/{q}/messages"
    batch = {"messages": [{"body": i, "id": f"b-{i}"} for i in range(10)]}
    status, first = call(c, 0, "POST", path, batch)
    assert status == 201 and {m["partition"] for m in first} == {
        partition_for("b-0", 8, counter=0)  # where the first one's id hashes
    }
    status, again = call(c, 1, "POST", path, batch)
    assert status == 201 and all(m["duplicate"] for m in again)
    assert [m["partition"] for m in again] == [m["partition"] for m in first]
    # Without ids: each request whole in one partition, requests round-robin.
    parts = []
    for n in range(8):
        status, reply = call(c, 2, "POST", path, {"messages": [{"body": n}] * 5})
        assert status == 201 and len({m["partition"] for m in reply}) == 1, reply
        parts.append(reply[0]["partition"])
    assert sorted(parts) == list(range(8))
    # Keyed messages in a batch still go where their key hashes.
    mixed = [{"body": "k1", "key": "k1"}, {"body": "a"}, {"body": "k2", "key": "k2"},
             {"body": "b"}]  # fmt: skip
    status, reply = call(c, 0, "POST", path, {"messages": mixed})
    assert status == 201
    assert reply[0]["partition"] == partition_for("k1", 8, counter=0)
    assert reply[2]["partition"] == partition_for("k2", 8, counter=0)
    assert reply[1]["partition"] == reply[3]["partition"]
    assert len(drain(c, q, 10 + 40 + 4, timeout=5)) == 54


def test_full_queue_answers_429(c: LocalCluster) -> None:
    q = new_queue(c, partitions=1, max_length=3)
    for i in range(3):
        assert call(c, i, "POST", f"/v1/queues/{q}/messages", {"body": i})[0] == 201
    status, err = call(c, 1, "POST", f"/v1/queues/{q}/messages", {"body": "one too many"})
    assert (status, err["error"]["code"]) == (429, "queue_full")
    assert "maximum length" in err["error"]["message"]
    got = consume(c, 0, q, max=1)
    call(c, 0, "POST", f"/v1/queues/{q}/ack", {"receipts": [got[0]["receipt"]]})
    deadline = time.monotonic() + 5  # trimming of acked messages runs once a second
    while time.monotonic() < deadline:
        if call(c, 2, "POST", f"/v1/queues/{q}/messages", {"body": "fits"})[0] == 201:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the queue stayed full after a message was acked")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("PUT", "/v1/queues/opts", {"partitions": 4, "colour": "red"}, 400, "bad_request"),
        ("PUT", "/v1/queues/opts", {"partitions": 0}, 400, "bad_request"),
        ("PUT", "/v1/queues/opts", {"replicas": 7}, 400, "bad_request"),
        ("PUT", "/v1/queues/bad%20name", {}, 400, "bad_request"),
        ("POST", "/v1/queues/x/messages", {"key": "k"}, 400, "bad_request"),
        ("POST", "/v1/queues/x/messages", {"body": 1, "extra": 2}, 400, "bad_request"),
        ("POST", "/v1/queues/x/messages", {"messages": []}, 400, "bad_request"),
        ("POST", "/v1/queues/x/messages", {"body": "x" * 300_000}, 413, "too_large"),
        ("POST", "/v1/queues/x/consume", {"max": 0}, 400, "bad_request"),
        ("POST", "/v1/queues/x/consume", {"visibility_ms": "soon"}, 400, "bad_request"),
        ("POST", "/v1/queues/x/ack", {"receipts": ["not-a-receipt"]}, 400, "bad_receipt"),
        ("POST", "/v1/queues/x/ack", {"receipts": []}, 400, "bad_request"),
        ("POST", "/enqueue", {"msg": 1}, 400, "bad_request"),
    ],
)
def test_bad_input_is_a_clear_4xx(c: LocalCluster, method: str, path: str, body: Any,
                                  status: int, code: str) -> None:
    got, err = call(c, 1, method, path, body)
    assert (got, err["error"]["code"]) == (status, code), err
    assert err["error"]["message"]


def test_malformed_json_is_400(c: LocalCluster) -> None:
    request = urllib.request.Request(c.nodes[0].url + "/v1/queues/x/messages",
                                     data=b'{"body": ', method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 400


def test_existing_queue_with_other_options_is_409(c: LocalCluster) -> None:
    q = new_queue(c, partitions=2)
    assert call(c, 1, "PUT", f"/v1/queues/{q}", {"partitions": 2})[0] == 200
    status, err = call(c, 2, "PUT", f"/v1/queues/{q}", {"partitions": 3})
    assert (status, err["error"]["code"]) == (409, "queue_exists")


def test_seed_aliases(c: LocalCluster) -> None:
    status, body = call(c, 0, "POST", "/enqueue", {"message": {"job": 1}})
    assert status == 201 and body["status"] == "ok"
    status, listing = call(c, 1, "GET", "/queue")
    assert status == 200 and {"job": 1} in listing["queue"]
    status, popped = call(c, 2, "POST", "/dequeue")
    assert status == 200 and popped["message"] == {"job": 1}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if call(c, 0, "POST", "/dequeue")[1]["message"] is None:
            break
    else:
        raise AssertionError("/dequeue kept returning messages")


def test_partitions_are_redis_streams_on_every_replica(c: LocalCluster) -> None:
    q = new_queue(c, partitions=1)
    status, sent = call(c, 0, "POST", f"/v1/queues/{q}/messages", {"body": {"hi": 1}, "key": "k"})
    assert status == 201
    for node in c.nodes:
        r = redis.Redis(port=node.port + REDIS_PORT_OFFSET, decode_responses=True)
        try:
            entries = r.xrange(f"dsync:q:{q}:0")
            assert [(e[1]["id"], e[1]["key"], e[1]["body"]) for e in entries] == [
                (sent["id"], "k", '{"hi":1}')
            ], node.node_id
            assert r.hget(f"dsync:q:{q}:0:meta", "end") == "1"
        finally:
            r.close()


def test_queue_metrics_are_exported(c: LocalCluster) -> None:
    q = new_queue(c, partitions=1)
    call(c, 0, "POST", f"/v1/queues/{q}/messages", {"body": 1})
    text = urllib.request.urlopen(c.nodes[0].url + "/metrics", timeout=5).read().decode()
    _, info = call(c, 0, "GET", f"/v1/queues/{q}")
    owner = info["partitions"][0]["owner"]
    owner_text = urllib.request.urlopen(
        c.nodes[int(owner[-1]) - 1].url + "/metrics", timeout=5
    ).read().decode()
    assert "dsync_queue_published_total" in owner_text
    assert "dsync_queue_publish_seconds_bucket" in owner_text
    assert "dsync_http_request_seconds" in text
