"""HTTP clients for the load drivers: a lean keep-alive client, and aiohttp's for comparison.

The benchmarks share two cores with the cluster they measure, so every microsecond the
driver spends per request is taken from the nodes. aiohttp's ClientSession costs about
75-90 us of CPU per request here (timeouts, tracing hooks, cookie handling, a connector
and a response object per request); the lean client writes each request in one send on a
kept-alive connection and parses the answer with httptools (llhttp, in C), about 17 us.
Measured on this machine against the nodes' /health with 64 workers: 11,770 req/s with
aiohttp against 27,577 with the lean client. Choose with `--http-client lean|aiohttp`.

Both answer `request(method, path, json_body, timeout)` with (status, JSON object body,
seconds); status 0 when there was no answer (a timeout or a connection error, named in
the body's error code), so the drivers count failures the same way with either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import aiohttp
import httptools  # type: ignore[import-untyped]

from service.transport.sessions import client_session

CLIENT_KINDS = ("lean", "aiohttp")
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class JsonClient(Protocol):
    async def request(
        self, method: str, path: str, body: Any, timeout: float
    ) -> tuple[int, dict[str, Any], float]: ...

    async def close(self) -> None: ...


def open_clients(kind: str, urls: list[str], limit: int) -> list[JsonClient]:
    """One client per node URL, each allowing `limit` requests in flight."""
    if kind == "lean":
        return [LeanClient(url, limit) for url in urls]
    if kind == "aiohttp":
        return [AiohttpClient(url, limit) for url in urls]
    raise ValueError(f"unknown HTTP client {kind!r}; choose from {', '.join(CLIENT_KINDS)}")


def _as_object(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _failure(code: str, started: float) -> tuple[int, dict[str, Any], float]:
    return 0, {"error": {"code": code}}, time.perf_counter() - started


# --- aiohttp -------------------------------------------------------------------------


class AiohttpClient:
    def __init__(self, base_url: str, limit: int) -> None:
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
        # Like the nodes' own sessions: a release (DELETE) is never sent twice behind
        # the driver's back, so what it counts is what it sent.
        self._session = client_session(base_url=base_url, connector=connector)

    async def request(
        self, method: str, path: str, body: Any, timeout: float
    ) -> tuple[int, dict[str, Any], float]:
        started = time.perf_counter()
        try:
            async with self._session.request(
                method, path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            return _failure("timeout", started)
        except (aiohttp.ClientError, OSError) as exc:
            return _failure(f"connection ({type(exc).__name__})", started)
        return status, _as_object(raw), time.perf_counter() - started

    async def close(self) -> None:
        await self._session.close()


# --- lean ------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self.reusable = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(ConnectionError("connection closed by the server"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            self._fail(ConnectionError("response body too large"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._parser.should_keep_alive():
            self.reusable = False
        waiter, self._waiter = self._waiter, None
        body, self._body, self._size = b"".join(self._body), [], 0
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), body))

    # use
    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self._transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._waiter

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self._transport is not None:
            self._transport.close()

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class LeanClient:
    """Kept-alive connections to one node, at most `limit` of them; a request takes an
    idle one, opens one while under the limit, or waits for one to come back."""

    def __init__(self, base_url: str, limit: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the lean client speaks plain http:// only, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._host_header = parts.netloc
        self._limit = max(1, limit)
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(
        self, method: str, path: str, body: Any, timeout: float
    ) -> tuple[int, dict[str, Any], float]:
        started = time.perf_counter()
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                connection = await self._acquire()
                status, raw = await connection.exchange(head + payload)
        except TimeoutError:
            if connection is not None:
                connection.close()  # an answer may still arrive: never reuse it
            return _failure("timeout", started)
        except OSError as exc:  # ConnectionError included
            return _failure(f"connection ({type(exc).__name__})", started)
        except asyncio.CancelledError:
            if connection is not None:
                connection.close()  # its answer is still owed: never reuse it
            raise
        finally:
            if connection is not None:
                self._release(connection)
        return status, _as_object(raw), time.perf_counter() - started

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise ConnectionError("client closed")
            while self._idle:
                connection = self._idle.pop()
                if connection.reusable:
                    return connection
                self._open -= 1
            if self._open < self._limit:
                self._open += 1
                try:
                    _, connection = await asyncio.get_running_loop().create_connection(
                        _Connection, self._host, self._port
                    )
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                return connection
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()
            self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports finish closing
