"""Talk to a node's call socket (service/transport/calls.py) by hand, as a peer would."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import msgpack

from service.transport.calls import CALLS_PATH


def send_call_frame(
    url: str, payload: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Send one frame to the node at `url`: (200, [[status, body] per call in order]) for
    a batch, (status, reason) for a batch refused whole, (close code, None) when the node
    closes the socket."""

    async def exchange() -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url + CALLS_PATH, headers=headers, max_msg_size=0) as ws,
        ):
            await ws.send_bytes(payload)
            calls = msgpack.unpackb(payload, raw=False)[1] if payload[:1] == b"\x92" else []
            answers: dict[int, list[Any]] = {}
            while True:
                message = await ws.receive(timeout=10)
                if message.type is not aiohttp.WSMsgType.BINARY:
                    return ws.close_code or 0, None
                # Each answer is [batch, index, status, body], in the order they finished.
                for _, index, status, body in msgpack.Unpacker(io.BytesIO(message.data), raw=False):
                    if index is None:
                        return status, body
                    answers[index] = [status, body]
                if len(answers) == len(calls):
                    return 200, [answers[i] for i in range(len(calls))]

    return asyncio.run(exchange())
