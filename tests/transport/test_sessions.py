"""Client sessions never send a request twice on their own (service/transport/sessions.py).

Regression: aiohttp resent a PUT or DELETE, on a new connection, when the kept-alive
connection it went out on died before the answer. A follower forwarded a client's PUT
to a leader that appended it and was then killed. The resend found the port closed, so
the failure read "could not connect, never sent", and the follower sent the PUT again to
the next leader. The write was applied twice, which broke a linearizability check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from service.transport.forward import ForwardError, LeaderClient
from service.transport.sessions import client_session

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class CrashingLeader:
    """Answers GETs; the first PUT or DELETE it reads "crashes" it: the connection is
    reset without an answer, and with `stop_listening` the port closes too (a killed
    process). A later PUT, on a new connection, is answered."""

    stop_listening: bool
    writes: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if method in (b"PUT", b"DELETE"):
                    self.writes.append(method)
                    if len(self.writes) == 1:
                        if self.stop_listening and self.server is not None:
                            self.server.close()
                        writer.transport.abort()
                        return
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            self.server.close()


async def put_after_warm_up(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/warm") as response:  # leaves a kept-alive connection
        await response.read()
    async with session.put(url + "/v1/kv/x", json={"value": "v"}) as response:
        await response.read()
        return response.status


async def test_aiohttp_alone_sends_a_put_twice_when_its_connection_dies() -> None:
    """Why sessions.py exists: with aiohttp's own session the PUT reaches the leader
    twice, and the client sees a success."""
    leader = CrashingLeader(stop_listening=False)
    async with leader.running() as url, aiohttp.ClientSession() as session:
        assert await put_after_warm_up(session, url) == 200
    assert leader.writes == [b"PUT", b"PUT"]


async def test_our_sessions_send_it_once_and_report_the_failure() -> None:
    leader = CrashingLeader(stop_listening=False)
    async with leader.running() as url, client_session() as session:
        with pytest.raises(aiohttp.ClientError) as caught:
            await put_after_warm_up(session, url)
    assert not isinstance(caught.value, aiohttp.ClientConnectorError)  # it was sent
    assert leader.writes == [b"PUT"]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_a_forward_to_a_leader_killed_mid_request_is_maybe_applied(method: str) -> None:
    leader = CrashingLeader(stop_listening=True)
    client = LeaderClient("n2", retry_deadline=1.0)
    try:
        async with leader.running() as url:
            status, _ = await client.forward_raw("GET", url + "/warm")
            assert status == 200
            with pytest.raises(ForwardError) as caught:
                await client.forward_raw(method, url + "/v1/kv/x", b'{"value": "v"}')
    finally:
        await client.close()
    # Before the fix: maybe_applied False ("never sent"), and the caller sent it on.
    assert caught.value.maybe_applied
    assert leader.writes == [method.encode()]


def test_the_node_makes_its_sessions_only_through_client_session() -> None:
    """A session made directly would bring the resend back unnoticed."""
    root = Path(__file__).resolve().parents[2]
    direct = [
        str(path.relative_to(root))
        for folder in ("service", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "sessions.py" and "ClientSession(" in path.read_text()
    ]
    assert direct == []
