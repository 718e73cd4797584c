"""Cache part of the REST contract (/v1/cache...) and the node-to-node routes the cache
service uses (/internal/v1/cache/...).

Every node serves every key from its own cache (a client reading or writing through node
X uses X's cache, as a processor uses its own); there is no forwarding here. Limits:
keys are 1-512 bytes of UTF-8 (400 beyond), values at most `max_value_bytes` of JSON
(256 KiB by default; 413 beyond), and the body at most MAX_BODY_BYTES (413).
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

import msgpack
from aiohttp import web

from service.api.calls import peer_call
from service.api.errors import ApiError, bad_request
from service.api.forwarding import NODE_KEY
from service.api.http import read_internal_body, read_json
from service.cache import wire
from service.cache.messages import ReadDone
from service.cache.mirror_store import MirrorUpdate, decode_position
from service.cache.mirrored import MirrorUnavailable
from service.cache.service import INTERNAL, MSGPACK, CacheError, CacheService
from service.cache.values import encode
from service.raft.core import RaftError
from service.transport.http import SECRET_HEADER

routes = web.RouteTableDef()

MAX_KEY_BYTES = 512
MAX_BATCH = 10_000
PUT_FIELDS = frozenset({"value", "request_id"})


def _service(request: web.Request) -> CacheService:
    cache = request.app[NODE_KEY].cache
    if cache is None or not cache.ready:
        raise ApiError(503, "unavailable", "the cache is starting on this node; retry shortly")
    return cache


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise bad_request(f"a cache key is at most {MAX_KEY_BYTES} bytes of UTF-8")
    return key


def _failed(exc: CacheError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


def _read_body(key: str, done: ReadDone) -> str:
    # The value is already canonical JSON text: splice it in rather than re-encode it.
    return (
        f'{{"key":{json.dumps(key, ensure_ascii=False)},"value":{done.data},'
        f'"version":{done.version},"state":"{done.state.value}",'
        f'"hit":{"true" if done.hit else "false"}}}'
    )


@routes.get("/v1/cache")
async def describe(request: web.Request) -> web.Response:
    """This node's cache; with `?scope=cluster` (an addition) every node's and totals."""
    scope = request.query.get("scope", "node")
    if scope not in ("node", "cluster"):
        raise bad_request('\'scope\' must be "node" or "cluster"')
    try:
        cache = _service(request)
        if scope == "cluster":
            return web.json_response(await cache.describe_cluster())
        return web.json_response(cache.describe())
    except CacheError as exc:
        raise _failed(exc) from exc


@routes.get("/v1/cache/{key}")
async def read(request: web.Request) -> web.Response:
    cache = _service(request)
    key = _key(request)
    try:
        done = await cache.read(key)
    except CacheError as exc:
        raise _failed(exc) from exc
    if not done.found:
        raise ApiError(
            404, "not_found", f"no value cached under {key!r}",
            key=key, version=done.version, state=done.state.value, hit=done.hit,
        )  # fmt: skip
    return web.Response(text=_read_body(key, done), content_type="application/json")


@routes.put("/v1/cache/{key}")
async def write(request: web.Request) -> web.Response:
    cache = _service(request)
    key = _key(request)
    body = await read_json(request)
    unknown = sorted(set(body) - PUT_FIELDS)
    if unknown:
        raise bad_request(f'unknown fields: {", ".join(unknown)}; send {{"value": <any JSON>}}')
    if "value" not in body:
        raise bad_request("'value' is required (any JSON value, null included)")
    try:
        text = encode(body["value"])
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    limit = cache.settings.max_value_bytes
    if len(text.encode()) > limit:
        raise ApiError(413, "too_large", f"the value is over {limit} bytes of JSON")
    try:
        done = await cache.write(key, body["value"])
    except CacheError as exc:
        raise _failed(exc) from exc
    return web.json_response({"key": key, "version": done.version})


@routes.delete("/v1/cache/{key}")
async def delete(request: web.Request) -> web.Response:
    cache = _service(request)
    key = _key(request)
    try:
        done = await cache.delete(key)
    except CacheError as exc:
        raise _failed(exc) from exc
    return web.json_response({"key": key, "deleted": True, "version": done.version})


@routes.get("/v1/cache/{key}/lines")
async def lines(request: web.Request) -> web.Response:
    cache = _service(request)
    return web.json_response(await cache.inspect(_key(request)))


# --- node to node ----------------------------------------------------------------------


def _packed(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgpack.packb(value, use_bin_type=True), status=status, content_type=MSGPACK
    )


async def _internal_body(request: web.Request) -> tuple[CacheService, dict[str, Any]]:
    node = request.app[NODE_KEY]
    secret = node.settings.cluster_secret
    if secret is not None:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode()):
            raise ApiError(401, "unauthorized", f"missing or wrong {SECRET_HEADER}")
    cache = node.cache
    if cache is None or not cache.ready:
        raise ApiError(503, "unavailable", "the cache is starting on this node")
    try:
        body = msgpack.unpackb(await read_internal_body(request), raw=False, strict_map_key=False)
    except ValueError as exc:
        raise bad_request(f"body is not msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("body is not a map")
    return cache, body


@routes.post(f"{INTERNAL}/describe")
async def describe_internal(request: web.Request) -> web.Response:
    cache, _ = await _internal_body(request)
    try:
        return _packed(cache.describe())
    except CacheError as exc:
        raise _failed(exc) from exc


@routes.post(f"{INTERNAL}/inspect")
async def inspect(request: web.Request) -> web.Response:
    cache, body = await _internal_body(request)
    key = body.get("key")
    if not isinstance(key, str) or len(key.encode()) > MAX_KEY_BYTES:
        raise bad_request("'key' must be a cache key")
    try:
        return _packed(cache.inspect_local(key))
    except CacheError as exc:
        raise _failed(exc) from exc


# --- mirrors of the peers' cache stores (batched peer calls; service/cache/mirrored.py) --

if TYPE_CHECKING:
    from service.node import Node


def _peer_failure(exc: Exception) -> tuple[int, Any]:
    if isinstance(exc, CacheError):
        return exc.status, {"error": {"code": exc.code, "message": exc.message}}
    if isinstance(exc, MirrorUnavailable):
        return 503, {"error": {"code": "unavailable", "message": str(exc)}}
    return 400, {"error": {"code": "bad_request", "message": repr(exc)}}


@peer_call("cache.messages")
async def _messages(node: Node, sender: str, body: dict[str, Any]) -> tuple[int, Any]:
    """Protocol messages from a peer's outbox (links.py), stepped into the cores here."""
    cache = node.cache
    if cache is None or not cache.ready:
        return 503, {"error": {"code": "unavailable", "message": "the cache is starting"}}
    raw = body.get("m")
    if not isinstance(raw, list) or len(raw) > MAX_BATCH:
        return _peer_failure(ValueError(f"'m' must be a list of at most {MAX_BATCH} messages"))
    try:
        batch = [wire.decode(item) for item in raw]
    except ValueError as exc:
        return _peer_failure(ValueError(f"bad cache message: {exc}"))
    if any(message.sender != sender for message in batch):
        return _peer_failure(ValueError("every message's sender must be the sending node"))
    cache.receive(sender, batch)
    return 200, {"n": len(batch)}


@peer_call("cache.mirror")
async def _mirror(node: Node, sender: str, body: dict[str, Any]) -> tuple[int, Any]:
    """Apply a peer's mirror update (to its copy here; sender = the peer)."""
    if node.cache is None:
        return 503, {"error": {"code": "unavailable", "message": "no cache here"}}
    try:
        position = decode_position(body["position"])
        base = decode_position(body["base"])
        writes = body["writes"]
        if position is None or not isinstance(writes, dict):
            raise ValueError("'position' and 'writes' are required")
        if not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in writes.items()
        ):
            raise ValueError("'writes' maps field names to JSON text or null")
        part, last = body.get("part", 0), body.get("last", True)
        if isinstance(part, bool) or not isinstance(part, int) or part < 0:
            raise ValueError("'part' must be a non-negative integer")
        if not isinstance(last, bool):
            raise ValueError("'last' must be a boolean")
        update = MirrorUpdate(position, writes, base, part, last)
        return 200, await node.cache.mirror_answer(sender, update)
    except (CacheError, KeyError, TypeError, ValueError) as exc:
        return _peer_failure(exc)


@peer_call("cache.mirror_image")
async def _mirror_image(node: Node, sender: str, body: dict[str, Any]) -> tuple[int, Any]:
    """This node's copy of the sender's cache store (for a sender that lost its disk)."""
    if node.cache is None:
        return 503, {"error": {"code": "unavailable", "message": "no cache here"}}
    try:
        return 200, await node.cache.mirror_image(sender)
    except CacheError as exc:
        return _peer_failure(exc)


@peer_call("cache.register")
async def _register(node: Node, sender: str, body: dict[str, Any]) -> tuple[int, Any]:
    """On the Raft leader: record that the sender's cache started (starts.py)."""
    if node.cache is None:
        return 503, {"error": {"code": "unavailable", "message": "no cache here"}}
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        return 400, {"error": {"code": "bad_request", "message": "'request_id' is required"}}
    try:
        return 200, await node.cache.record_start(sender, request_id)
    except (MirrorUnavailable, RaftError, TimeoutError) as exc:
        return 503, {"error": {"code": "unavailable", "message": repr(exc)}}
