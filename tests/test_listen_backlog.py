"""The node's HTTP listener queues a burst of connections instead of dropping them."""

from __future__ import annotations

import socket

from aiohttp import web

from service.node import HTTP_LISTEN_BACKLOG, http_site

BURST = 300  # more than aiohttp's default backlog (128), fewer than the node's


async def test_a_burst_of_connections_is_queued_while_the_node_is_busy() -> None:
    runner = web.AppRunner(web.Application(), handle_signals=False)
    await runner.setup()
    site = http_site(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sockets: list[socket.socket] = []
    try:
        # The connects below run without yielding: the node's loop cannot accept, as
        # when it is busy. The kernel completes handshakes only up to the backlog; past
        # it, it drops the SYN and the connect would wait for a retry (1 s, 3 s, ...).
        for _ in range(BURST):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
        assert len(sockets) == BURST <= HTTP_LISTEN_BACKLOG
    finally:
        for s in sockets:
            s.close()
        await runner.cleanup()
