"""Builds the aiohttp application of a node from each part's routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from service.api import cache, calls, cluster, kv, locks, queues
from service.api.forwarding import NODE_KEY
from service.api.http import (
    MAX_BODY_KEY,
    METRICS_KEY,
    STREAMS_KEY,
    error_middleware,
    metrics_middleware,
)
from service.transport.http import raft_routes
from service.transport.streams import OpenStreams

if TYPE_CHECKING:
    from service.node import Node


def create_app(node: Node) -> web.Application:
    # Metrics outermost so they record the status the error middleware chose.
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware],
        client_max_size=node.settings.max_body_bytes,
    )
    app[NODE_KEY] = node
    app[METRICS_KEY] = node.metrics
    app[MAX_BODY_KEY] = node.settings.max_body_bytes
    streams = app[STREAMS_KEY] = OpenStreams()

    async def close_streams(_app: web.Application) -> None:
        # Peers' sockets would hold the graceful shutdown for its whole timeout.
        await streams.close_all()

    app.on_shutdown.append(close_streams)
    app.add_routes(cluster.routes)
    app.add_routes(kv.routes)
    app.add_routes(locks.routes)
    app.add_routes(calls.routes)
    app.add_routes(queues.routes)
    app.add_routes(cache.routes)
    app.add_routes(raft_routes(node))
    return app
