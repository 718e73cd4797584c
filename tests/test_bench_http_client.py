"""The load drivers' lean HTTP client: answers, failures and its connection limit."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from benchmarks.http_client import LeanClient, open_clients


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, int]]]:
    seen = {"in_flight": 0, "most_in_flight": 0, "requests": 0}

    async def echo(request: web.Request) -> web.Response:
        seen["requests"] += 1
        seen["in_flight"] += 1
        seen["most_in_flight"] = max(seen["most_in_flight"], seen["in_flight"])
        try:
            body = await request.json() if request.can_read_body else None
            delay = float(request.query.get("delay", "0"))
            if delay:
                await asyncio.sleep(delay)
            headers = {"Connection": "close"} if "close" in request.query else None
            return web.json_response(
                {"method": request.method, "path": request.path, "body": body},
                status=int(request.query.get("status", "200")),
                headers=headers,
            )
        finally:
            seen["in_flight"] -= 1

    async def garbage(request: web.Request) -> web.StreamResponse:
        # Not HTTP at all: write raw bytes on the socket and hang up.
        transport = request.transport
        assert transport is not None
        transport.write(b"this is not an HTTP response\r\n\r\n")
        transport.close()
        return web.Response()

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b'{"parts": ', b'[1, 2, 3]', b"}"):
            await response.write(part)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/garbage", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_json_round_trip_on_a_kept_alive_connection(
    server: tuple[str, dict[str, int]],
) -> None:
    url, seen = server
    client = LeanClient(url, limit=4)
    try:
        for i in range(5):
            status, body, seconds = await client.request("POST", "/echo", {"n": i}, 5)
            assert status == 200 and seconds > 0
            assert body == {"method": "POST", "path": "/echo", "body": {"n": i}}
        status, body, _ = await client.request("DELETE", "/echo?status=404", None, 5)
        assert status == 404 and body["body"] is None
        assert client._open == 1  # one connection carried all six
    finally:
        await client.close()
    assert seen["requests"] == 6


async def test_a_chunked_answer_is_read_whole(server: tuple[str, dict[str, int]]) -> None:
    url, _ = server
    client = LeanClient(url, limit=1)
    try:
        for _ in range(2):  # and the connection is reusable after it
            status, body, _ = await client.request("GET", "/chunked", None, 5)
            assert (status, body) == (200, {"parts": [1, 2, 3]})
        assert client._open == 1
    finally:
        await client.close()


async def test_a_connection_the_server_closes_is_replaced(
    server: tuple[str, dict[str, int]],
) -> None:
    url, _ = server
    client = LeanClient(url, limit=1)
    try:
        status, _, _ = await client.request("GET", "/echo?close=1", None, 5)
        assert status == 200
        # The server said Connection: close; the next request opens a new connection.
        status, body, _ = await client.request("GET", "/echo", None, 5)
        assert status == 200 and body["path"] == "/echo"
    finally:
        await client.close()


async def test_timeouts_refusals_and_garbage_are_status_zero(
    server: tuple[str, dict[str, int]],
) -> None:
    url, _ = server
    client = LeanClient(url, limit=2)
    try:
        status, body, _ = await client.request("GET", "/echo?delay=2", None, 0.2)
        assert status == 0 and body["error"]["code"] == "timeout"
        status, body, _ = await client.request("GET", "/garbage", None, 5)
        assert status == 0 and body["error"]["code"].startswith("connection")
        # Neither broken connection is reused: the next request is answered normally.
        status, _, _ = await client.request("GET", "/echo", None, 5)
        assert status == 200
    finally:
        await client.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # nothing listens here once closed
    refused = LeanClient(f"http://127.0.0.1:{free}", limit=1)
    try:
        status, body, _ = await refused.request("GET", "/", None, 5)
        assert status == 0 and body["error"]["code"].startswith("connection")
        assert refused._open == 0
    finally:
        await refused.close()


async def test_a_cancelled_request_leaves_no_connection_half_used(
    server: tuple[str, dict[str, int]],
) -> None:
    # A request cancelled while it waited for its answer put its connection back as
    # idle: the next request on it failed an assertion (scale_bench.py long-poll, which
    # cancels its consumers' polls at the end).
    url, _ = server
    client = LeanClient(url, limit=1)
    try:
        slow = asyncio.ensure_future(client.request("GET", "/echo?delay=2", None, 5))
        await asyncio.sleep(0.1)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        status, body, _ = await client.request("GET", "/echo", None, 5)
        assert status == 200 and body["path"] == "/echo"
    finally:
        await client.close()


async def test_at_most_limit_requests_are_in_flight(server: tuple[str, dict[str, int]]) -> None:
    url, seen = server
    client = LeanClient(url, limit=3)
    try:
        answers = await asyncio.gather(
            *(client.request("GET", "/echo?delay=0.05", None, 5) for _ in range(12))
        )
    finally:
        await client.close()
    assert [status for status, _, _ in answers] == [200] * 12
    assert seen["most_in_flight"] == 3


async def test_both_kinds_answer_alike(server: tuple[str, dict[str, int]]) -> None:
    url, _ = server
    for client in open_clients("lean", [url], 2) + open_clients("aiohttp", [url], 2):
        try:
            assert (await client.request("PUT", "/echo", {"a": 1}, 5))[:2] == (
                200,
                {"method": "PUT", "path": "/echo", "body": {"a": 1}},
            )
        finally:
            await client.close()
    with pytest.raises(ValueError):
        open_clients("curl", [url], 1)
    with pytest.raises(ValueError):
        LeanClient("https://127.0.0.1:1", 1)
