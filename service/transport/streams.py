"""Node-to-node WebSockets: the settings both ends share, and the server's open set.

Peers talk over long-lived WebSockets instead of one HTTP request per batch: a request
costs both nodes about 140 us of CPU on this kind of machine (headers built and parsed,
a response, the pool), a WebSocket frame about 20 us for the round trip. The Raft
transport (http.py) and the batched calls (calls.py) each keep one per peer.

A server handler of a WebSocket runs as long as the connection, and aiohttp's graceful
shutdown waits for running handlers up to its shutdown timeout (a minute). So every
server-side socket is kept in an `OpenStreams`, which the application closes when it
shuts down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiohttp
from aiohttp import web

# A ping every HEARTBEAT_SECONDS; no pong within half of it closes the connection. A
# busy peer answers a ping when its loop next reads the socket, so this must outlast
# the longest pause of a loaded node's loop (a snapshot, a full collection).
HEARTBEAT_SECONDS = 4.0
# How long closing waits for the peer's closing frame.
CLOSE_TIMEOUT_SECONDS = 1.0

# Errors that mean "this connection is gone" when writing a frame.
SEND_ERRORS = (aiohttp.ClientError, ConnectionError, RuntimeError)


class OpenStreams:
    """The server-side WebSockets still open, closed together at shutdown."""

    def __init__(self) -> None:
        self._open: set[web.WebSocketResponse] = set()

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(self, ws: web.WebSocketResponse) -> Iterator[None]:
        self._open.add(ws)
        try:
            yield
        finally:
            self._open.discard(ws)

    async def close_all(self) -> None:
        for ws in list(self._open):
            with contextlib.suppress(*SEND_ERRORS):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutting down")


def server_socket(
    max_frame_bytes: int, heartbeat: float = HEARTBEAT_SECONDS
) -> web.WebSocketResponse:
    """A server-side WebSocket for a peer's stream. It pings too: a peer that vanished
    without closing (its host gone, a partition) would otherwise leave its handler
    waiting here for good."""
    return web.WebSocketResponse(
        timeout=CLOSE_TIMEOUT_SECONDS,
        compress=False,
        max_msg_size=max_frame_bytes,
        heartbeat=heartbeat,
    )
