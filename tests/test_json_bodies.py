"""Reading a client's JSON body: which documents a node refuses before any route sees
them, and what a client that stalls or leaves mid-body gets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp
import pytest
from aiohttp import web

from service.api.http import (
    BODY_TIMEOUT_KEY,
    MAX_BODY_KEY,
    MAX_JSON_DEPTH,
    check_json_document,
    error_middleware,
    read_json,
)


def nested(levels: int) -> object:
    doc: object = 1
    for _ in range(levels):
        doc = [doc]
    return doc


def test_depth_up_to_the_limit_is_accepted_and_one_more_is_not() -> None:
    # The body object is level 1, so its value may add MAX_JSON_DEPTH - 1 levels.
    assert check_json_document({"v": nested(MAX_JSON_DEPTH - 1)}, depth=True,
                               surrogates=False) is None
    problem = check_json_document({"v": nested(MAX_JSON_DEPTH)}, depth=True, surrogates=False)
    assert problem is not None and str(MAX_JSON_DEPTH) in problem


def test_a_very_deep_document_is_refused_without_exhausting_the_stack() -> None:
    assert check_json_document(nested(100_000), depth=True, surrogates=False) is not None


def test_lone_surrogates_are_refused_in_values_and_keys_anywhere() -> None:
    for doc in ({"owner": "\ud800"}, {"v": [{"a": ["x", "\udfff"]}]}, {"v": {"\udc00": 1}}):
        problem = check_json_document(doc, depth=False, surrogates=True)
        assert problem is not None and "surrogate" in problem, doc


def test_a_surrogate_pair_is_a_character_and_accepted() -> None:
    doc = json.loads('{"owner": "\\ud83d\\ude00"}')
    assert doc == {"owner": "\U0001f600"}
    assert check_json_document(doc, depth=True, surrogates=True) is None


def test_checks_that_are_off_do_not_run() -> None:
    assert check_json_document({"owner": "\ud800"}, depth=True, surrogates=False) is None
    assert check_json_document(nested(MAX_JSON_DEPTH + 5), depth=False,
                               surrogates=True) is None


# --- reading the body: a client that stalls or leaves -------------------------------


async def _serve_read_json(body_timeout: float) -> tuple[web.AppRunner, int]:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response(await read_json(request))

    app = web.Application(middlewares=[error_middleware])
    app[MAX_BODY_KEY] = 1 << 20
    app[BODY_TIMEOUT_KEY] = body_timeout
    app.router.add_post("/echo", echo)
    # lingering_time: after answering a request whose body it did not read, aiohttp
    # keeps reading (and dropping) that body for up to 10 s before it closes; cleanup
    # would wait that long for the stalled client's connection.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, lingering_time=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def _send_partial_body(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 40\r\n\r\n{\"owner\": ")
    await writer.drain()
    return reader, writer


async def test_a_body_that_stalls_gets_408_once_the_body_timeout_passes() -> None:
    runner, port = await _serve_read_json(body_timeout=0.3)
    try:
        reader, writer = await _send_partial_body(port)
        started = time.monotonic()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            reply = await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(reply)["error"]["code"] == "body_timeout"
        assert 0.25 < time.monotonic() - started < 3
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_client_leaving_mid_body_is_no_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner, port = await _serve_read_json(body_timeout=5)
    try:
        with caplog.at_level(logging.INFO):
            _, writer = await _send_partial_body(port)
            writer.close()
            await writer.wait_closed()
            # The server answers (or finishes) a well-formed request meanwhile.
            async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/echo", json={"ok": 1}
            ) as response:
                assert response.status == 200
            await asyncio.sleep(0.2)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
    finally:
        await runner.cleanup()


async def test_a_client_gone_before_its_answer_is_no_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Seen as an ERROR with a traceback when a peer dropped a WebSocket handshake under
    # load (aiohttp raises ClientConnectionResetError writing the 101's headers).
    async def gone(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()  # as when the client has gone
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    async def peer_reset(request: web.Request) -> web.Response:
        raise aiohttp.ClientConnectionResetError("a peer's connection, not the client's")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/gone", gone)
    app.router.add_get("/peer-reset", peer_reset)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with caplog.at_level(logging.INFO):
            async with aiohttp.ClientSession() as session:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/gone") as response:
                        await response.read()
            await asyncio.sleep(0.1)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
        assert any("client went away" in r.getMessage() for r in caplog.records)
        # A reset that is not the client's is still a server error, answered and logged.
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/peer-reset"
        ) as response:
            assert response.status == 500
    finally:
        await runner.cleanup()
