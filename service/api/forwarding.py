"""Any node serves any endpoint: writes and linearizable reads run on the leader, so a
follower forwards the whole request there and relays the answer.

Hops are counted: during an election two nodes may briefly name each other as leader,
and a bounded hop count turns that into a clear 503 instead of a loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service.api.errors import error_response
from service.api.http import request_id_header
from service.raft.core import NotLeader
from service.transport.forward import ForwardError

if TYPE_CHECKING:
    from service.node import Node

HOPS_HEADER = "X-Dsync-Hops"
MAX_HOPS = 2
LEADER_WAIT_SECONDS = 3.0
FORWARD_TIMEOUT_SECONDS = 10.0

NODE_KEY: web.AppKey[Node] = web.AppKey("node")

LocalHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def on_leader(handler: LocalHandler) -> LocalHandler:
    """Run handler here if this node leads, else forward the request to the leader."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        node = request.app[NODE_KEY]
        if node.runner is None:
            return error_response(503, "unavailable", "node is starting; retry shortly")
        if not node.is_leader():
            return await forward(request)
        try:
            return await handler(request)
        except NotLeader:
            # Leadership moved while we handled it; the command was never proposed here.
            return await forward(request)

    return wrapped


async def forward(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    hops = _hops(request)
    if hops >= MAX_HOPS:
        return error_response(503, "no_leader", "no stable leader right now; retry shortly")
    body = await request.read()
    parsed = _parse(body)
    idempotent = is_idempotent_body(request, parsed)
    headers = {HOPS_HEADER: str(hops + 1)}
    request_id = request_id_header(request)  # 400 before anything is sent when unusable
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEADER_WAIT_SECONDS
    failed_leader: str | None = None
    while True:
        leader = await node.wait_for_leader(
            max(0.0, deadline - loop.time()), other_than=failed_leader
        )
        if leader is None:
            return error_response(503, "no_leader", "no leader is elected right now; retry shortly")
        if leader == node.node_id:
            # We became leader while waiting: handle it here.
            return await _redispatch(request)
        url = node.peer_urls.get(leader)
        if url is None or node.forwarder is None:
            return error_response(503, "no_leader", f"leader {leader} has no known address")
        try:
            status, payload = await node.forwarder.forward_raw(
                request.method,
                url + request.rel_url.path_qs,
                body or None,
                headers=headers,
                timeout=FORWARD_TIMEOUT_SECONDS + wait_seconds(parsed),
                idempotent=idempotent,
            )
        except ForwardError as exc:
            if (exc.maybe_applied and not idempotent) or loop.time() >= deadline:
                return forward_failed(leader, exc.maybe_applied)
            # The leader we knew is gone; once another is elected, send it there (safe:
            # it never reached the old leader, or it carries a request_id).
            failed_leader = leader
            continue
        return web.Response(status=status, body=payload, content_type="application/json")


def forward_failed(leader: str, maybe_applied: bool) -> web.Response:
    if maybe_applied:
        return error_response(
            503,
            "unavailable",
            f"leader {leader} did not answer; the outcome is unknown, retry with the "
            "same request_id to apply it at most once",
        )
    return error_response(503, "unavailable", f"could not reach leader {leader}; retry")


def _hops(request: web.Request) -> int:
    try:
        return int(request.headers.get(HOPS_HEADER, "0"))
    except ValueError:
        return MAX_HOPS


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except (ValueError, RecursionError):
        # Malformed, or nested past the decoder's recursion limit: the leader answers
        # the client with a 400 (read_json).
        return None


def wait_seconds(parsed: Any) -> float:
    """How long the request may legitimately be held: its wait_ms, if it has one."""
    # A blocking acquire or a long-poll consume may legitimately hold the request.
    wait = parsed.get("wait_ms") if isinstance(parsed, dict) else None
    if isinstance(wait, int) and not isinstance(wait, bool) and 0 < wait <= 3_600_000:
        return wait / 1000
    return 0.0


def is_idempotent_body(request: web.Request, parsed: Any) -> bool:
    """True when repeating the request cannot apply it twice (a read, or a request_id)."""
    if request.method in ("GET", "HEAD"):
        return True
    if "X-Request-Id" in request.headers:
        return True
    return isinstance(parsed, dict) and isinstance(parsed.get("request_id"), str)


async def _redispatch(request: web.Request) -> web.StreamResponse:
    match = await request.app.router.resolve(request)
    return await match.handler(request)
