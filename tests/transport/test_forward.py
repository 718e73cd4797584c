"""LeaderClient retries only where a retry cannot apply a command twice."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from multidict import CIMultiDict

from service.transport.forward import (
    FORWARDED_HEADER,
    ForwardError,
    LeaderClient,
    is_forwarded,
)
from service.transport.http import FROM_HEADER, SECRET_HEADER

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Leader:
    """A stand-in for the leader's REST API that records what reached it."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, CIMultiDict[str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _record(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.headers.copy(), await request.read()))
        return await self.handler(request)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[LeaderClient]:
    c = LeaderClient(
        "n2",
        secret="pw",
        max_attempts=3,
        retry_deadline=5.0,
        backoff_initial=0.02,
        backoff_max=0.05,
    )
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def leaders() -> AsyncIterator[list[Leader]]:
    started: list[Leader] = []
    try:
        yield started
    finally:
        for leader in started:
            await leader.stop()


async def serve(leaders: list[Leader], handler: Handler, port: int = 0) -> Leader:
    leader = Leader(handler)
    await leader.start(port)
    leaders.append(leader)
    return leader


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "path": request.path})


def slow(seconds: float) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.json_response({"late": True})

    return handler


async def test_refused_then_up_is_retried_even_when_not_idempotent(leaders: list[Leader]) -> None:
    port = free_port()
    c = LeaderClient("n2", max_attempts=50, retry_deadline=5.0, backoff_initial=0.02,
                     backoff_max=0.05)
    try:
        call = asyncio.create_task(c.forward("POST", f"http://127.0.0.1:{port}/locks/x",
                                             {"op": "acquire"}))
        await asyncio.sleep(0.3)  # several refused attempts happen meanwhile
        assert not call.done()
        leader = await serve(leaders, ok, port)
        status, body = await asyncio.wait_for(call, 5.0)
        assert status == 200 and body == {"ok": True, "path": "/locks/x"}
        assert len(leader.requests) == 1  # the command reached the leader exactly once
    finally:
        await c.close()


async def test_refused_throughout_fails_as_never_applied(client: LeaderClient) -> None:
    url = f"http://127.0.0.1:{free_port()}/kv/a"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ForwardError) as err:
        await client.forward("POST", url, {"v": 1})
    assert err.value.maybe_applied is False
    assert loop.time() - started < 2.0  # bounded: 3 attempts, short waits


async def test_timeout_of_non_idempotent_request_is_not_retried(
    client: LeaderClient, leaders: list[Leader]
) -> None:
    leader = await serve(leaders, slow(1.0))
    with pytest.raises(ForwardError) as err:
        await client.forward("POST", leader.url + "/locks/x", {"op": "acquire"}, timeout=0.2)
    assert err.value.maybe_applied is True  # outcome unknown, not "failed"
    await asyncio.sleep(0.3)  # a retry, if any, would have arrived by now
    assert len(leader.requests) == 1


async def test_timeout_of_idempotent_request_is_retried(
    client: LeaderClient, leaders: list[Leader]
) -> None:
    leader = await serve(leaders, slow(1.0))
    with pytest.raises(ForwardError) as err:
        await client.forward("POST", leader.url + "/locks/x",
                             {"op": "acquire", "request_id": "r1"}, timeout=0.2,
                             idempotent=True)
    assert err.value.maybe_applied is True
    assert len(leader.requests) == 3  # max_attempts


async def test_get_is_idempotent_by_default(client: LeaderClient, leaders: list[Leader]) -> None:
    leader = await serve(leaders, slow(1.0))
    with pytest.raises(ForwardError):
        await client.forward("GET", leader.url + "/kv/a", timeout=0.2)
    assert len(leader.requests) == 3


async def test_disconnect_after_send_is_not_retried(client: LeaderClient) -> None:
    seen = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        await reader.readuntil(b"\r\n\r\n")  # the request arrived...
        writer.close()  # ...and the connection dies before any answer

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ForwardError) as err:
            await client.forward("POST", f"http://127.0.0.1:{port}/locks/x", {"op": "x"})
        assert err.value.maybe_applied is True
        await asyncio.sleep(0.1)
        assert seen == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_error_status_is_returned_not_retried(
    client: LeaderClient, leaders: list[Leader]
) -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "no_leader"}}, status=503)

    leader = await serve(leaders, busy)
    status, body = await client.forward("GET", leader.url + "/kv/a")
    assert status == 503 and body == {"error": {"code": "no_leader"}}
    assert len(leader.requests) == 1


async def test_headers_loop_guard_and_secret(client: LeaderClient, leaders: list[Leader]) -> None:
    leader = await serve(leaders, ok)
    await client.forward(
        "POST",
        leader.url + "/kv/a",
        {"v": 1},
        headers={
            "X-Request-Id": "abc",
            SECRET_HEADER: "spoofed",
            "Host": "evil.example",
            "Content-Length": "99",
        },
    )
    _, headers, body = leader.requests[0]
    assert headers[FORWARDED_HEADER] == "1"
    assert is_forwarded(headers)
    assert headers[SECRET_HEADER] == "pw"  # ours, not the caller's
    assert headers[FROM_HEADER] == "n2"
    assert headers["X-Request-Id"] == "abc"
    assert headers["Host"].startswith("127.0.0.1")
    assert headers["Content-Type"] == "application/json"
    assert body == b'{"v": 1}'


async def test_forward_raw_relays_bytes(client: LeaderClient, leaders: list[Leader]) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/json")

    leader = await serve(leaders, echo)
    status, payload = await client.forward_raw("PUT", leader.url + "/kv/a", b'{"raw": 1}')
    assert status == 200 and payload == b'{"raw": 1}'


async def test_empty_and_non_json_bodies(client: LeaderClient, leaders: list[Leader]) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/empty":
            return web.Response(status=204)
        return web.Response(text="<html>oops</html>", content_type="text/html")

    leader = await serve(leaders, handler)
    assert await client.forward("DELETE", leader.url + "/empty") == (204, None)
    # Not JSON (a proxy's error page, aiohttp's plain-text 404...): the status still
    # says what happened, so it is returned rather than turned into an exception.
    assert await client.forward("GET", leader.url + "/html") == (200, None)


async def test_oversized_response_is_an_error(leaders: list[Leader]) -> None:
    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"[" + b"1," * 10_000 + b"1]", content_type="application/json")

    leader = await serve(leaders, huge)
    async with LeaderClient("n2", max_response_bytes=1000) as c:
        with pytest.raises(ForwardError):
            await c.forward("GET", leader.url + "/big")
    assert len(leader.requests) == 1  # a size problem is not retried


async def test_redirects_are_not_followed(client: LeaderClient, leaders: list[Leader]) -> None:
    async def moved(request: web.Request) -> web.Response:
        if request.path == "/new":
            return web.json_response({"followed": True})
        raise web.HTTPTemporaryRedirect("/new")

    leader = await serve(leaders, moved)
    status, _ = await client.forward("POST", leader.url + "/old", {"x": 1})
    assert status == 307
    assert [r[0] for r in leader.requests] == ["POST"]


async def test_closed_client_refuses(leaders: list[Leader]) -> None:
    leader = await serve(leaders, ok)
    c = LeaderClient("n2")
    await c.close()
    with pytest.raises(ForwardError) as err:
        await c.forward("GET", leader.url)
    assert err.value.maybe_applied is False
    assert leader.requests == []
