"""/v1/kv/{key}: a linearizable replicated register (an addition to the v1 contract)."""

from __future__ import annotations

from aiohttp import web

from service.api.errors import ApiError, bad_request
from service.api.forwarding import NODE_KEY, on_leader
from service.api.http import read_json, request_id_of
from service.statemachine import Command

routes = web.RouteTableDef()

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 64 * 1024
TIMEOUT_SECONDS = 5.0


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if len(key.encode()) > MAX_KEY_BYTES:
        raise bad_request(f"key is longer than {MAX_KEY_BYTES} bytes")
    return key


@routes.get("/v1/kv/{key}")
@on_leader
async def get_value(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    key = _key(request)
    assert node.runner is not None
    await node.runner.read_barrier(TIMEOUT_SECONDS)
    item = node.kv.get(key)
    if item is None:
        raise ApiError(404, "not_found", f"key {key!r} does not exist")
    return web.json_response({"key": key, "value": item[0], "version": item[1]})


@routes.put("/v1/kv/{key}")
@on_leader
async def put_value(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    key = _key(request)
    body = await read_json(request)
    value = body.get("value")
    if not isinstance(value, str):
        raise bad_request("'value' must be a string")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise ApiError(413, "too_large", f"'value' is over {MAX_VALUE_BYTES} bytes")
    expected = body.get("expected_version")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
        raise bad_request("'expected_version' must be an integer")
    args: dict[str, object] = {"key": key, "value": value}
    if expected is not None:
        args["expected_version"] = expected
    assert node.runner is not None
    result = await node.runner.propose(
        Command("kv.put", args, request_id_of(request, body)), TIMEOUT_SECONDS
    )
    if result.get("status") == "conflict":
        raise ApiError(
            409,
            "version_conflict",
            "expected_version does not match",
            version=result.get("version"),
        )
    return web.json_response({"key": key, "version": result["version"]})


@routes.delete("/v1/kv/{key}")
@on_leader
async def delete_value(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    key = _key(request)
    body = await read_json(request, required=False)
    assert node.runner is not None
    result = await node.runner.propose(
        Command("kv.delete", {"key": key}, request_id_of(request, body)), TIMEOUT_SECONDS
    )
    if result.get("status") == "not_found":
        raise ApiError(404, "not_found", f"key {key!r} does not exist")
    return web.json_response({"deleted": True})
