"""Batched node-to-node calls: writes that run on the Raft leader, and service RPCs.

Leader calls. A route registers the leader-side half of a write with
`@leader_call("lock.acquire")`: a coroutine taking the node and JSON-able args and
returning the 200 body (or raising ApiError). `run_on_leader` runs it here when this
node leads, and otherwise sends it to the leader through the node's CallBatcher
(service/transport/calls.py), which packs the calls of many clients into one peer
request; a call that may wait (`wait_ms`) travels in a lane of its own. Calls whose
args cannot travel keep the plain HTTP forward of service/api/forwarding.py.

The leader side answers every call with `[status, body]`; a node that is no longer the
leader answers NOT_LEADER without running it, and the caller sends it to the new leader.
A call that may have reached a leader that then failed is sent again, to the next leader,
when it carries a request_id (the state machine applies it once) or its command is
idempotent by itself (`resend_safe`: a lock acquire, which the lock table answers with the
owner's current grant or place in the queue); otherwise the client is told the outcome is
unknown, exactly as with the HTTP forward. A call sent again keeps what remains of its
`wait_ms` when it carries no request_id (with one, its arguments must not change).

Peer calls. `@peer_call("queue.publish")` registers a service's node-to-node RPC (the
queue's partition traffic); it runs on whichever node it is sent to, is given the
sending node's id, and returns `(status, body)` itself. Callers use
`CallBatcher.call` directly, so the RPCs of many clients share one peer request.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service.api.errors import ApiError, error_body, error_response
from service.api.forwarding import (
    FORWARD_TIMEOUT_SECONDS,
    LEADER_WAIT_SECONDS,
    NODE_KEY,
    forward,
    forward_failed,
    is_idempotent_body,
    wait_seconds,
)
from service.api.http import INTERNAL_MAX_BODY_BYTES, STREAMS_KEY, raft_error
from service.raft.core import NotLeader
from service.transport.calls import CALLS_PATH, serve_call_socket
from service.transport.forward import ForwardError
from service.transport.http import SECRET_HEADER

if TYPE_CHECKING:
    from service.node import Node

log = logging.getLogger("dsync.api")

LeaderCall = Callable[["Node", dict[str, Any]], Awaitable[dict[str, Any]]]
# (node, sending node id, args) -> (status, body)
PeerCall = Callable[["Node", str, dict[str, Any]], Awaitable[tuple[int, Any]]]

# 421 Misdirected Request: "not the node that can answer this"; never reaches a client.
NOT_LEADER = 421

# A call whose outcome was lost with its leader is sent to the next one at most this often.
MAX_RESENDS = 3

_CALLS: dict[str, LeaderCall] = {}
_RESEND_SAFE: set[str] = set()
_PEER_CALLS: dict[str, PeerCall] = {}

routes = web.RouteTableDef()


def leader_call(name: str, resend_safe: bool = False) -> Callable[[LeaderCall], LeaderCall]:
    """Register a leader call; `resend_safe` when applying its command twice has the
    effect of applying it once, so a copy whose outcome was lost may be sent again."""

    def register(handler: LeaderCall) -> LeaderCall:
        _claim(name)
        _CALLS[name] = handler
        if resend_safe:
            _RESEND_SAFE.add(name)
        return handler

    return register


def peer_call(name: str) -> Callable[[PeerCall], PeerCall]:
    def register(handler: PeerCall) -> PeerCall:
        _claim(name)
        _PEER_CALLS[name] = handler
        return handler

    return register


def _claim(name: str) -> None:
    if name in _CALLS or name in _PEER_CALLS:
        raise ValueError(f"call {name!r} is registered twice")


async def run_on_leader(
    request: web.Request, name: str, args: dict[str, Any]
) -> web.StreamResponse:
    """Answer `request` with call `name` run on the leader (here, or batched there).

    A call that may wait (a body with `wait_ms`) goes in the `wait` lane, with a timeout
    that covers its wait; the rest share the default lane."""
    node = request.app[NODE_KEY]
    handler = _CALLS[name]
    if node.runner is None:
        return error_response(503, "unavailable", "node is starting; retry shortly")
    carries_id = is_idempotent_body(request, args.get("body"))
    idempotent = carries_id or name in _RESEND_SAFE
    waits = budget = wait_seconds(args.get("body"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + LEADER_WAIT_SECONDS
    refused_by: str | None = None
    resends = 0
    while True:
        lane = "wait" if waits > 0 else "default"
        timeout = FORWARD_TIMEOUT_SECONDS + waits
        leader = await node.wait_for_leader(
            max(0.0, deadline - loop.time()), other_than=refused_by
        )
        if leader is None:
            return error_response(503, "no_leader", "no leader is elected right now; retry shortly")
        if leader == node.node_id:
            try:
                return web.json_response(await handler(node, args))
            except NotLeader:
                # Leadership moved before the command was proposed: send it on.
                refused_by = leader
                continue
        if node.calls is None:
            return await forward(request)
        url = node.peer_urls.get(leader)
        if url is None:
            return error_response(503, "no_leader", f"leader {leader} has no known address")
        try:
            status, body = await node.calls.call(url, name, args, lane=lane, timeout=timeout)
        except ValueError:
            return await forward(request)  # args msgpack cannot carry; JSON can
        except ForwardError as exc:
            if exc.maybe_applied and (not idempotent or resends == MAX_RESENDS):
                return forward_failed(leader, exc.maybe_applied)
            if not exc.maybe_applied and loop.time() >= deadline:
                return forward_failed(leader, exc.maybe_applied)
            if exc.maybe_applied:
                # The leader failed while it had the call (a blocking acquire may have
                # waited there for seconds): the next leader gets a full election's time.
                resends += 1
                deadline = max(deadline, loop.time() + LEADER_WAIT_SECONDS)
            if waits > 0 and not carries_id:
                args, waits = _with_wait_left(args, budget - (loop.time() - started))
            refused_by = leader
            continue
        if status == NOT_LEADER:
            if loop.time() >= deadline:
                return error_response(503, "no_leader", "no stable leader right now; retry")
            refused_by = leader
            continue
        return web.json_response(body, status=status)


def _with_wait_left(args: dict[str, Any], left: float) -> tuple[dict[str, Any], float]:
    """`args` with its body's wait_ms cut to what is left of it (0 once spent: the
    leader then settles at once, cancelling a wait the first copy queued)."""
    wait_ms = max(0, int(left * 1000))
    return {**args, "body": {**args["body"], "wait_ms": wait_ms}}, wait_ms / 1000


@routes.get(CALLS_PATH)
async def serve_calls(request: web.Request) -> web.StreamResponse:
    """A peer's call socket (service/transport/calls.py): each batch's calls run
    concurrently, each answer leaves as soon as it is ready."""
    node = request.app[NODE_KEY]
    secret = node.settings.cluster_secret
    if secret is not None:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode()):
            return web.Response(status=401, text="bad cluster secret")
    if node.runner is None:
        return web.Response(status=503, text="node is starting")
    return await serve_call_socket(
        request,
        functools.partial(_run_one, node),
        request.app[STREAMS_KEY],
        max_frame_bytes=INTERNAL_MAX_BODY_BYTES,
    )


async def _run_one(node: Node, sender: str, call: Any) -> tuple[int, Any]:
    if not (isinstance(call, list) and len(call) == 2 and isinstance(call[1], dict)):
        return 400, error_body("bad_request", "a call is [name, args]")
    name, args = call
    peer_handler = _PEER_CALLS.get(name) if isinstance(name, str) else None
    if peer_handler is not None:
        try:
            return await peer_handler(node, sender, args)
        except Exception:
            log.exception("peer call failed", extra={"call": name})
            return 500, error_body("internal", "internal error; see the node's log")
    handler = _CALLS.get(name) if isinstance(name, str) else None
    if handler is None:
        return 400, error_body("bad_request", f"unknown call {name!r}")
    if not node.is_leader():
        return NOT_LEADER, error_body("not_leader", "this node is not the leader")
    try:
        body = await handler(node, args)
    except ApiError as exc:
        return exc.status, error_body(exc.code, exc.message, **exc.extra)
    except NotLeader:
        return NOT_LEADER, error_body("not_leader", "this node is not the leader")
    except Exception as exc:
        mapped = raft_error(exc)
        if mapped is not None:
            return mapped.status, error_body(mapped.code, mapped.message, **mapped.extra)
        log.exception("leader call failed", extra={"call": name})
        return 500, error_body("internal", "internal error; see the leader's log")
    return 200, body
