"""Cluster endpoints: /health, /v1/cluster, /metrics."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.forwarding import NODE_KEY
from service.raft.core import Role

routes = web.RouteTableDef()


def _role_name(role: Role) -> str:
    # The API names three roles; a pre-candidate is a candidate to the outside world.
    return "candidate" if role in (Role.CANDIDATE, Role.PRE_CANDIDATE) else role.value


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    if node.runner is None:
        return web.json_response(
            {
                "status": "starting",
                "node": node.node_id,
                "role": "follower",
                "term": 0,
                "leader": None,
                "commit_index": 0,
                "applied_index": 0,
                "last_log_index": 0,
            }
        )
    status = node.runner.status()
    failed = node.runner.fatal_error is not None
    # A node whose storage writes are failing (its Redis down or its disk full) cannot
    # commit anything: not healthy, though it may recover (the Redis supervisor) or stop.
    storage_ok = (node.runner.storage_failing_since is None
                  and not node.runner.storage_stalled())
    healthy = not failed and storage_ok
    return web.json_response(
        {
            "status": "failed" if failed else "ok" if storage_ok else "degraded",
            "storage": "ok" if storage_ok else "failing",
            "node": node.node_id,
            "role": _role_name(status.role),
            "term": status.term,
            "leader": status.leader,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            # Additions: a node back from lost storage asks its peers these (rejoin.py).
            "last_log_index": status.last_index,
            "rejoining": status.rejoining,
        },
        status=200 if healthy else 503,
    )


@routes.get("/v1/cluster")
async def cluster(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    if node.runner is None:
        return web.json_response(
            {"error": {"code": "unavailable", "message": "starting"}}, status=503
        )
    status = node.runner.status()
    members: list[dict[str, Any]] = []
    for member in sorted(set(status.voters) | set(node.peer_urls) | {node.node_id}):
        entry: dict[str, Any] = {
            "id": member,
            "url": node.self_url if member == node.node_id else node.peer_urls.get(member),
            "voter": member in status.voters,
            "role": (
                _role_name(status.role)
                if member == node.node_id
                else ("leader" if member == status.leader else "follower")
            ),
        }
        if member == node.node_id:
            entry["alive"] = True
            entry["match_index"] = status.last_index
        elif member in status.progress:
            match, _next, active = status.progress[member]
            entry["alive"] = active
            entry["match_index"] = match
        else:
            entry["alive"] = None  # only the leader tracks its followers
            entry["match_index"] = None
        members.append(entry)
    return web.json_response(
        {
            "node": node.node_id,
            "leader": status.leader,
            "term": status.term,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            "snapshot_index": status.snapshot_index,
            "members": members,
        }
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    response = web.Response(body=node.metrics.render())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response
