"""Queues part of the REST contract (/v1/queues...), the prototype's /enqueue, /queue and
/dequeue, and the node-to-node calls the queue service makes (`queue.*` peer calls).

Additions to the contract: `PUT /v1/queues/{queue}` (create with options; publishing to
an unknown queue creates it with the defaults) and `GET /v1/queues` (list).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service.api.calls import peer_call
from service.api.errors import ApiError, bad_request
from service.api.forwarding import NODE_KEY
from service.api.http import field_int, read_json
from service.queue.base import (
    Delivered,
    QueueError,
    parse_receipt,
)
from service.queue.meta import QueueOptions
from service.queue.replica import NotPartitionLeader
from service.queue.service import QueueService

if TYPE_CHECKING:
    from service.node import Node

routes = web.RouteTableDef()

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MAX_MESSAGE_BYTES = 256 * 1024
MAX_BATCH = 1_000
MAX_KEY_BYTES = 256
MAX_ID_BYTES = 128
MAX_CONSUME = 1_000
MAX_VISIBILITY_MS = 12 * 3600 * 1000
MAX_WAIT_MS = 60_000
MAX_DELAY_MS = 12 * 3600 * 1000
OPTION_LIMITS = {
    "partitions": (1, 256),
    "replicas": (1, 9),
    "max_length": (1, 10**9),
    "delivery_limit": (1, 1_000),
}
SEED_QUEUE = "default"


def _service(request: web.Request) -> QueueService:
    queues = request.app[NODE_KEY].queues
    if queues is None or queues.runner is None:
        raise ApiError(503, "unavailable", "the queue service is not running on this node")
    return queues


def _name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise bad_request(f"{what} must be 1-128 characters of A-Z a-z 0-9 _ . -")
    return value


def _queue(request: web.Request) -> str:
    return _name(request.match_info["queue"], "queue name")


def _check_fields(body: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(
            f"unknown {what}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


async def _call(coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    except QueueError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from exc


def _parse_message(raw: Any) -> tuple[str | None, str | None, str]:
    if not isinstance(raw, dict):
        raise bad_request("each message must be a JSON object with a 'body'")
    _check_fields(raw, {"body", "key", "id"}, "message fields")
    if "body" not in raw:
        raise bad_request("a message needs a 'body' (any JSON value)")
    body = json.dumps(raw["body"], separators=(",", ":"))
    if len(body.encode()) > MAX_MESSAGE_BYTES:
        raise ApiError(413, "too_large", f"a message body is over {MAX_MESSAGE_BYTES} bytes")
    key = raw.get("key")
    if key is not None and (not isinstance(key, str) or len(key.encode()) > MAX_KEY_BYTES):
        raise bad_request(f"'key' must be a string of at most {MAX_KEY_BYTES} bytes")
    message_id = raw.get("id")
    if message_id is not None and (
        not isinstance(message_id, str) or not message_id
        or len(message_id.encode()) > MAX_ID_BYTES
    ):
        raise bad_request(f"'id' must be a non-empty string of at most {MAX_ID_BYTES} bytes")
    return message_id, key, body


def _delivered_json(d: Delivered) -> dict[str, Any]:
    return {"id": d.id, "receipt": d.receipt, "partition": d.partition, "key": d.key,
            "body": json.loads(d.body), "delivery_count": d.delivery_count}


def _receipts(body: dict[str, Any]) -> list[tuple[int, int, int]]:
    raw = body.get("receipts")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_CONSUME:
        raise bad_request(f"'receipts' must be a list of 1-{MAX_CONSUME} receipts")
    try:
        return [parse_receipt(r) for r in raw]
    except ValueError as exc:
        raise ApiError(
            400, "bad_receipt", f"{exc}; use receipts exactly as consume returned them"
        ) from exc


def _group(body: dict[str, Any]) -> str:
    group = body.get("group", "default")
    if not isinstance(group, str):
        raise bad_request("'group' must be a string")
    return _name(group, "group")


# --- /v1/queues ------------------------------------------------------------------------


@routes.put("/v1/queues/{queue}")
async def create_queue(request: web.Request) -> web.Response:
    queues = _service(request)
    queue = _queue(request)
    body = await read_json(request, required=False)
    _check_fields(body, set(OPTION_LIMITS), "queue options")
    defaults = queues.default_options().to_dict()
    values = {k: field_int(body, k, defaults[k], *OPTION_LIMITS[k]) for k in OPTION_LIMITS}
    options = QueueOptions(**values)
    result = await _call(queues.create_queue(queue, options, if_absent=False))
    status = 201 if result.get("status") == "created" else 200
    return web.json_response({"queue": queue, **options.to_dict()}, status=status)


@routes.get("/v1/queues")
async def list_queues(request: web.Request) -> web.Response:
    queues = _service(request)
    return web.json_response(
        {"queues": [{"queue": m.name, **m.options.to_dict()} for m in queues.meta.queues()]}
    )


@routes.post("/v1/queues/{queue}/messages")
async def publish(request: web.Request) -> web.Response:
    queues = _service(request)
    queue = _queue(request)
    body = await read_json(request)
    if "messages" in body:
        _check_fields(body, {"messages"}, "fields")
        raw = body["messages"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BATCH:
            raise bad_request(f"'messages' must be a list of 1-{MAX_BATCH} messages")
        messages = [_parse_message(m) for m in raw]
    else:
        messages = [_parse_message(body)]
    results = await _call(queues.publish(queue, messages))
    out = [{"id": r.id, "partition": partition, "duplicate": r.duplicate}
           for partition, r in results]
    if "messages" in body:
        return web.json_response(out, status=201)
    return web.json_response(out[0], status=201)


@routes.post("/v1/queues/{queue}/consume")
async def consume(request: web.Request) -> web.Response:
    queues = _service(request)
    queue = _queue(request)
    body = await read_json(request, required=False)
    _check_fields(body, {"group", "consumer", "max", "visibility_ms", "wait_ms"}, "fields")
    consumer = body.get("consumer", "anonymous")
    if not isinstance(consumer, str) or not consumer or len(consumer.encode()) > 256:
        raise bad_request("'consumer' must be a non-empty string of at most 256 bytes")
    messages = await _call(queues.consume(
        queue, _group(body), consumer,
        field_int(body, "max", 1, 1, MAX_CONSUME),
        field_int(body, "visibility_ms", 30_000, 100, MAX_VISIBILITY_MS),
        field_int(body, "wait_ms", 0, 0, MAX_WAIT_MS),
    ))
    if messages and request.transport is None:
        # The client hung up while it long-polled: nobody will see these, so they go
        # to another consumer now rather than when their visibility ends.
        queues.hand_back(queue, _group(body), messages)
    return web.json_response({"messages": [_delivered_json(m) for m in messages]})


@routes.post("/v1/queues/{queue}/ack")
async def ack(request: web.Request) -> web.Response:
    queues = _service(request)
    queue = _queue(request)
    body = await read_json(request)
    _check_fields(body, {"group", "receipts"}, "fields")
    statuses = await _call(queues.settle(queue, _group(body), _receipts(body), None))
    return web.json_response({"acked": statuses.count("acked"), "results": statuses})


@routes.post("/v1/queues/{queue}/nack")
async def nack(request: web.Request) -> web.Response:
    queues = _service(request)
    queue = _queue(request)
    body = await read_json(request)
    _check_fields(body, {"group", "receipts", "delay_ms"}, "fields")
    delay = field_int(body, "delay_ms", 0, 0, MAX_DELAY_MS)
    statuses = await _call(queues.settle(queue, _group(body), _receipts(body), delay))
    return web.json_response({"nacked": statuses.count("nacked"), "results": statuses})


@routes.get("/v1/queues/{queue}")
async def describe(request: web.Request) -> web.Response:
    queues = _service(request)
    queue = _queue(request)
    meta = queues.meta.get(queue)
    if meta is None:
        raise ApiError(404, "not_found", f"no queue {queue!r}")
    gathered = await _call(queues.gather(queue, "stats", {"queue": queue},
                                         lambda: queues.stats_local(queue)))
    stats: dict[int, Any] = {}
    for part in gathered:
        stats.update({int(k): v for k, v in part.items()})
    partitions = []
    for index, part in enumerate(meta.partitions):
        partitions.append({
            "partition": index, "owner": part.leader, "replicas": list(part.replicas),
            "isr": list(part.isr), "epoch": part.epoch,
            **stats.get(index, {"available": False}),
        })
    dead = sum(int(s.get("dead_letters", 0)) for s in stats.values())
    return web.json_response({"queue": queue, **meta.options.to_dict(),
                              "partitions": partitions, "dead_letters": dead})


@routes.get("/v1/queues/{queue}/dead-letters")
async def dead_letters(request: web.Request) -> web.Response:
    queues = _service(request)
    queue = _queue(request)
    limit = 100
    if "limit" in request.query:
        try:
            limit = int(request.query["limit"])
        except ValueError:
            limit = -1
        if not 1 <= limit <= 10_000:
            raise bad_request("'limit' must be an integer from 1 to 10000")
    gathered = await _call(queues.gather(queue, "dead", {"queue": queue, "limit": limit},
                                         lambda: queues.dead_local(queue, limit)))
    messages = [m for part in gathered for m in part]
    for m in messages:
        m["body"] = json.loads(m["body"])
    return web.json_response({"messages": messages[:limit]})


# --- the course prototype's aliases ----------------------------------------------------


@routes.post("/enqueue")
async def seed_enqueue(request: web.Request) -> web.Response:
    queues = _service(request)
    body = await read_json(request)
    if "message" not in body:
        raise bad_request("'message' is required")
    encoded = json.dumps(body["message"], separators=(",", ":"))
    if len(encoded.encode()) > MAX_MESSAGE_BYTES:
        raise ApiError(413, "too_large", f"the message is over {MAX_MESSAGE_BYTES} bytes")
    results = await _call(queues.publish(SEED_QUEUE, [(None, None, encoded)]))
    partition, result = results[0]
    return web.json_response({"status": "ok", "id": result.id, "partition": partition},
                             status=201)


@routes.get("/queue")
async def seed_queue(request: web.Request) -> web.Response:
    queues = _service(request)
    if queues.meta.get(SEED_QUEUE) is None:
        return web.json_response({"queue": [], "length": 0})
    gathered = await _call(queues.gather(SEED_QUEUE, "peek", {"queue": SEED_QUEUE, "limit": 100},
                                         lambda: queues.peek_local(SEED_QUEUE, 100)))
    bodies = [json.loads(b) for part in gathered for b in part]
    stats = await _call(queues.gather(SEED_QUEUE, "stats", {"queue": SEED_QUEUE},
                                      lambda: queues.stats_local(SEED_QUEUE)))
    length = sum(int(s["length"]) for part in stats for s in part.values())
    return web.json_response({"queue": bodies[:100], "length": length})


@routes.post("/dequeue")
async def seed_dequeue(request: web.Request) -> web.Response:
    """Take one message and ack it at once (the prototype's at-most-once pop)."""
    queues = _service(request)
    messages = await _call(queues.consume(SEED_QUEUE, "default", "seed", 1, 30_000, 0))
    if not messages:
        return web.json_response({"message": None})
    m = messages[0]
    partition, offset, count = parse_receipt(m.receipt)
    await _call(queues.settle(SEED_QUEUE, "default", [(partition, offset, count)], None))
    return web.json_response({"message": json.loads(m.body), "id": m.id})


# --- node to node ----------------------------------------------------------------------

InternalHandler = Callable[[QueueService, str, dict[str, Any]], Awaitable[Any]]


def _internal(name: str) -> Callable[[InternalHandler], InternalHandler]:
    """Register a node-to-node queue RPC as the batched peer call `queue.<name>` (what
    QueueService._rpc sends; service/api/calls.py checks the cluster secret)."""

    def register(handler: InternalHandler) -> InternalHandler:
        async def run(node: Node, sender: str, body: Any) -> tuple[int, Any]:
            queues = node.queues
            if queues is None or queues.runner is None:
                return 503, {"error": {"code": "unavailable"}}
            if not isinstance(body, dict):
                return 400, {"error": {"code": "bad_request", "message": "body is not a map"}}
            try:
                return 200, await handler(queues, sender, body)
            except NotPartitionLeader as exc:
                return 409, {"error": {"code": "not_leader", "message": str(exc)}}
            except QueueError as exc:
                return exc.status, {"error": {"code": exc.code, "message": exc.message}}
            except (KeyError, TypeError, ValueError) as exc:
                return 400, {"error": {"code": "bad_request", "message": repr(exc)}}

        peer_call(f"queue.{name}")(run)
        return handler

    return register


@_internal("replicate")
async def _replicate(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    return await q.handle_replicate(sender, list(body["items"]))


@_internal("publish")
async def _publish(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    queue = str(body["queue"])

    async def local(partition: int, items: Any) -> Any:
        results = await q.publish_local(queue, partition,
                                        [(str(i), k, str(b)) for i, k, b in items])
        return [[r.offset, r.id, r.duplicate] for r in results]

    return await q.serve_parts(list(body["parts"]), local)


@_internal("consume")
async def _consume(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    delivered = q.consume_local(str(body["queue"]), str(body["group"]), str(body["consumer"]),
                                int(body["max"]), int(body["visibility_ms"]))
    return [d.to_wire() for d in delivered]


@_internal("watch")
async def _watch(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    timeout_ms = min(max(int(body["timeout_ms"]), 0), 60_000)
    return await q.watch(str(body["queue"]), str(body["group"]), timeout_ms / 1000)


@_internal("settle")
async def _settle(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    queue, group = str(body["queue"]), str(body["group"])
    delay = body.get("delay_ms")

    async def local(partition: int, items: Any) -> Any:
        receipts = [(int(p), int(o), int(c)) for p, o, c in items]
        return q.settle_local(queue, group, receipts, None if delay is None else int(delay))

    return await q.serve_parts(list(body["parts"]), local)


@_internal("propose")
async def _propose(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    return await q.propose_here(str(body["op"]), dict(body["args"]))


@_internal("stats")
async def _stats(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    return q.stats_local(str(body["queue"]))


@_internal("dead")
async def _dead(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    return q.dead_local(str(body["queue"]), int(body["limit"]))


@_internal("peek")
async def _peek(q: QueueService, sender: str, body: dict[str, Any]) -> Any:
    return q.peek_local(str(body["queue"]), int(body["limit"]))
