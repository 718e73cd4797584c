"""One contract, two transports: every test in the first part runs on the in-memory
network and on real aiohttp servers on 127.0.0.1; the second part covers what only the
HTTP transport has (secret, status codes, body limits, backoff).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.raft.messages import (
    AppendRequest,
    Entry,
    Message,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
)
from service.transport.codec import encode_batch
from service.transport.http import (
    CONTENT_TYPE,
    FROM_HEADER,
    RAFT_PATH,
    RAFT_STREAM_PATH,
    SECRET_HEADER,
    HttpTransport,
    attach,
    raft_routes,
)
from service.transport.memory import InMemoryNetwork, InMemoryTransport
from service.transport.protocols import BoundedMessageQueue, Transport

WAIT = 5.0  # upper bound for anything that should happen "soon"


async def eventually(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def hb(src: str, dst: str, n: int = 0) -> AppendRequest:
    """A heartbeat numbered by `commit` so tests can check order."""
    return AppendRequest(term=1, src=src, dst=dst, prev_index=0, prev_term=0, entries=(),
                         commit=n)


@dataclass(eq=False)
class Node:
    node_id: str
    url: str
    transport: HttpTransport | InMemoryTransport
    batches: list[list[Message]] = field(default_factory=list)

    @property
    def received(self) -> list[Message]:
        return [m for b in self.batches for m in b]

    def commits_from(self, src: str) -> list[int]:
        return [m.commit for m in self.received if isinstance(m, AppendRequest) and m.src == src]


class Cluster:
    """Builds nodes of one implementation; subclasses provide the wiring."""

    kind = ""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    async def add(self, node_id: str, **options: Any) -> Node:
        raise NotImplementedError

    async def blackhole_url(self) -> str:
        """An address that accepts nothing useful and never answers."""
        raise NotImplementedError

    async def stop(self, node: Node) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def urls(self) -> dict[str, str]:
        return {n.node_id: n.url for n in self.nodes.values()}

    async def full_mesh(self, *ids: str, **options: Any) -> list[Node]:
        nodes = [await self.add(i, **options) for i in ids]
        for n in nodes:
            n.transport.set_peers(self.urls())
        return nodes


class MemoryCluster(Cluster):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.network = InMemoryNetwork()
        self._generation = 0

    async def add(self, node_id: str, **options: Any) -> Node:
        options.pop("secret", None)
        options.pop("request_timeout", None)
        self._generation += 1
        address = self.network.address(f"{node_id}-{self._generation}")
        holder: list[Node] = []
        transport = self.network.transport(
            node_id, {}, lambda b: holder[0].batches.append(b), address=address, **options
        )
        node = Node(node_id, address, transport)
        holder.append(node)
        await transport.start()
        self.nodes[node_id] = node
        return node

    async def blackhole_url(self) -> str:
        return self.network.address("nowhere")

    async def stop(self, node: Node) -> None:
        await node.transport.close()

    async def aclose(self) -> None:
        for n in self.nodes.values():
            await n.transport.close()


class HttpCluster(Cluster):
    kind = "http"

    def __init__(self) -> None:
        super().__init__()
        self.runners: dict[Node, web.AppRunner] = {}
        self.blackholes: list[asyncio.Server] = []
        self.held: list[asyncio.StreamWriter] = []

    async def add(self, node_id: str, **options: Any) -> Node:
        holder: list[Node] = []
        transport = HttpTransport(node_id, {}, lambda b: holder[0].batches.append(b), **options)
        app = web.Application()
        attach(app, transport)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        node = Node(node_id, f"http://127.0.0.1:{port}", transport)
        holder.append(node)
        await transport.start()
        self.runners[node] = runner
        self.nodes[node_id] = node
        return node

    async def blackhole_url(self) -> str:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.held.append(writer)
            # Read and never answer, until the client gives up (bounded for safety).
            try:
                async with asyncio.timeout(30):
                    while await reader.read(65536):
                        pass
            except (TimeoutError, OSError):
                pass
            writer.close()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.blackholes.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self, node: Node) -> None:
        await node.transport.close()
        runner = self.runners.pop(node, None)
        if runner is not None:
            await runner.cleanup()

    async def aclose(self) -> None:
        for n in list(self.nodes.values()):
            await self.stop(n)
        for w in self.held:
            w.close()
        for s in self.blackholes:
            s.close()
            await s.wait_closed()
        # Let the blackhole handlers see their connections closed and finish.
        await asyncio.sleep(0.01)


@pytest.fixture(params=["memory", "http"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    c: Cluster = MemoryCluster() if request.param == "memory" else HttpCluster()
    try:
        yield c
    finally:
        await c.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the shared contract -------------------------------------------------------------


def test_both_satisfy_the_protocol() -> None:
    network = InMemoryNetwork()
    transports: list[Transport] = [
        HttpTransport("a", {}, lambda b: None),
        network.transport("a", {}, lambda b: None),
    ]
    assert len(transports) == 2


async def test_messages_reach_the_right_node(cluster: Cluster) -> None:
    a, b, c = await cluster.full_mesh("a", "b", "c")
    to_b = VoteRequest(term=2, src="a", dst="b", last_log_index=5, last_log_term=1)
    to_c = TimeoutNow(term=2, src="a", dst="c")
    a.transport.send([to_b, to_c])
    await eventually(lambda: bool(b.received and c.received))
    await asyncio.sleep(0.05)  # nothing else trickles in
    assert b.received == [to_b]
    assert c.received == [to_c]
    assert a.received == []


async def test_all_message_kinds_travel_intact(cluster: Cluster) -> None:
    a, b = await cluster.full_mesh("a", "b")
    snap = Snapshot(SnapshotMeta(index=9, term=2, voters=("a", "b")), data=b"\x00state\xff")
    msgs: list[Message] = [
        AppendRequest(term=3, src="a", dst="b", prev_index=4, prev_term=2, commit=4,
                      read_ctx=7, entries=(Entry(5, 3, data=b"x"), Entry(6, 3))),
        SnapshotRequest(term=3, src="a", dst="b", snapshot=snap),
        VoteRequest(term=4, src="a", dst="b", last_log_index=6, last_log_term=3,
                    prevote=True, transfer=True),
    ]
    a.transport.send(msgs)
    await eventually(lambda: len(b.received) == 3)
    assert b.received == msgs


async def test_many_sends_arrive_in_order_and_batched(cluster: Cluster) -> None:
    a, b, c = await cluster.full_mesh("a", "b", "c")
    n = 400
    for i in range(n):
        a.transport.send([hb("a", "b", i)])
        c.transport.send([hb("c", "b", i)])
        if i % 50 == 0:
            await asyncio.sleep(0)  # let some go out mid-stream
    await eventually(lambda: len(b.received) == 2 * n)
    assert b.commits_from("a") == list(range(n))
    assert b.commits_from("c") == list(range(n))
    # Group send: far fewer deliveries than send() calls.
    assert len(b.batches) < n / 4
    assert all(len({m.src for m in batch}) == 1 for batch in b.batches)
    assert a.transport.stats.sent == n and a.transport.stats.dropped == 0


async def test_down_peer_does_not_block_send_or_other_peers(cluster: Cluster) -> None:
    # A long request timeout: if the live peer's messages waited behind the dead one's,
    # they would arrive seconds late and the time check below would catch it.
    a, b = await cluster.full_mesh("a", "b", request_timeout=5.0, max_queue_messages=200)
    a.transport.set_peers({**cluster.urls(), "x": await cluster.blackhole_url()})
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(2000):
        a.transport.send([hb("a", "x", i), hb("a", "b", i)])
        if i % 10 == 0:
            # A few per loop turn, like a runner; b's queue never nears its bound.
            await asyncio.sleep(0)
    assert loop.time() - started < 1.0  # send() never waited on anything
    await eventually(lambda: len(b.received) == 2000, timeout=2.0)
    assert b.commits_from("a") == list(range(2000))
    assert loop.time() - started < 2.0
    # The dead peer's queue stayed bounded; the excess was dropped, oldest first.
    assert a.transport.queue_length("x") <= 200
    # (a few may have left in the first request, which is still hanging)
    assert a.transport.stats.dropped >= 2000 - 200 - 10


async def test_unknown_destination_is_dropped_not_raised(cluster: Cluster) -> None:
    a, b = await cluster.full_mesh("a", "b")
    a.transport.send([hb("a", "nobody"), hb("a", "a"), hb("a", "b", 1)])
    await eventually(lambda: len(b.received) == 1)
    assert a.transport.stats.dropped == 2


async def test_set_peers_adds_moves_and_removes(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    c = await cluster.add("c")
    a.transport.set_peers({"a": a.url, "b": b.url})

    a.transport.send([hb("a", "c", 1)])  # c is not a peer yet
    a.transport.send([hb("a", "b", 1)])
    await eventually(lambda: len(b.received) == 1)
    assert c.received == []

    a.transport.set_peers({"b": b.url, "c": c.url})
    a.transport.send([hb("a", "c", 2)])
    await eventually(lambda: c.commits_from("a") == [2])

    # b restarts at a new address; a learns it through set_peers.
    await cluster.stop(b)
    b2 = await cluster.add("b")
    assert b2.url != b.url
    a.transport.set_peers({"b": b2.url, "c": c.url})
    a.transport.send([hb("a", "b", 3)])
    await eventually(lambda: b2.commits_from("a") == [3])

    a.transport.set_peers({"c": c.url})  # b removed from the cluster
    dropped = a.transport.stats.dropped
    a.transport.send([hb("a", "b", 4), hb("a", "c", 4)])
    await eventually(lambda: c.commits_from("a") == [2, 4])
    assert b2.commits_from("a") == [3]
    assert a.transport.stats.dropped == dropped + 1


async def test_receiver_refuses_messages_for_another_node(cluster: Cluster) -> None:
    a, b, c = await cluster.full_mesh("a", "b", "c")
    # a's address book is stale: it thinks b lives at c's address.
    a.transport.set_peers({"b": c.url, "c": c.url})
    a.transport.send([hb("a", "b", 1)])
    await eventually(lambda: c.transport.stats.rejected == 1)
    a.transport.send([hb("a", "c", 2)])
    await eventually(lambda: len(c.received) == 1)
    assert c.received == [hb("a", "c", 2)]
    assert b.received == []


async def test_messages_sent_before_start_go_out_after_start(cluster: Cluster) -> None:
    b = await cluster.add("b")
    if isinstance(cluster, MemoryCluster):
        got: list[list[Message]] = []
        early: Transport = cluster.network.transport("a", {"b": b.url}, got.append)
    else:
        early = HttpTransport("a", {"b": b.url}, lambda batch: None)
    early.send([hb("a", "b", 1)])
    await asyncio.sleep(0.02)
    assert b.received == []
    await early.start()
    try:
        await eventually(lambda: b.commits_from("a") == [1])
    finally:
        await early.close()


async def test_close_is_clean_and_final(cluster: Cluster) -> None:
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: problems.append(ctx))
    before = asyncio.all_tasks()
    try:
        a, b = await cluster.full_mesh("a", "b")
        a.transport.set_peers({**cluster.urls(), "x": await cluster.blackhole_url()})
        for i in range(100):
            a.transport.send([hb("a", "b", i), hb("a", "x", i)])
        await eventually(lambda: len(b.received) == 100)
        a.transport.send([hb("a", "b", 100), hb("a", "x", 100)])
        started = loop.time()
        await a.transport.close()
        await b.transport.close()
        assert loop.time() - started < 1.0  # a request hanging on x did not hold close()
        await a.transport.close()  # idempotent

        a.transport.send([hb("a", "b", 999)])  # after close: dropped, no error
        await asyncio.sleep(0.05)
        assert 999 not in b.commits_from("a")

        await cluster.aclose()
        await asyncio.sleep(0.05)
        gc.collect()
        leftover = {t for t in asyncio.all_tasks() - before if not t.done()}
        assert leftover == set()
    finally:
        loop.set_exception_handler(previous)
    assert problems == []


# --- HTTP only -------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[HttpCluster]:
    c = HttpCluster()
    try:
        yield c
    finally:
        await c.aclose()


async def test_wrong_secret_delivers_nothing(http: HttpCluster) -> None:
    a = await http.add("a", secret="s3cret-A")
    b = await http.add("b", secret="s3cret-B")
    a.transport.set_peers(http.urls())
    a.transport.send([hb("a", "b", 1)])
    await eventually(lambda: a.transport.stats.failed_requests >= 1)
    assert b.received == []
    assert b.transport.stats.rejected >= 1

    c = await http.add("c", secret="s3cret-B")
    c.transport.set_peers(http.urls())
    c.transport.send([hb("c", "b", 1)])
    await eventually(lambda: b.commits_from("c") == [1])


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + RAFT_PATH, data=body,
                                                     headers=headers) as resp:
        payload = await resp.json() if resp.status != 204 else None
        return resp.status, payload


async def test_handler_status_codes(http: HttpCluster) -> None:
    b = await http.add("b", secret="pw", max_body_bytes=4096)
    good = encode_batch([hb("a", "b", 1)])
    ok = {SECRET_HEADER: "pw", "Content-Type": CONTENT_TYPE}

    status, payload = await post(b.url, good, {"Content-Type": CONTENT_TYPE})
    assert status == 401 and payload["error"]["code"] == "unauthorized"
    status, payload = await post(b.url, good, {**ok, SECRET_HEADER: "pX"})
    assert status == 401 and payload["error"]["code"] == "unauthorized"
    status, payload = await post(b.url, good, {**ok, "Content-Type": "application/json"})
    assert status == 415
    status, payload = await post(b.url, b"\x93garbage", ok)
    assert status == 400 and payload["error"]["code"] == "bad_request"
    status, payload = await post(b.url, encode_batch([hb("a", "c")]), ok)
    assert status == 400 and payload["error"]["code"] == "wrong_node"
    status, payload = await post(b.url, good, {**ok, FROM_HEADER: "z"})
    assert status == 400
    status, payload = await post(b.url, b"\x00" * 5000, ok)
    assert status == 413 and payload["error"]["code"] == "body_too_large"
    assert b.received == []

    status, _ = await post(b.url, good, {**ok, FROM_HEADER: "a"})
    assert status == 204
    assert b.received == [hb("a", "b", 1)]


async def test_chunked_body_over_limit_is_413(http: HttpCluster) -> None:
    b = await http.add("b", max_body_bytes=4096)

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\x00" * 1000

    async with aiohttp.ClientSession() as s, s.post(
        b.url + RAFT_PATH, data=stream(), headers={"Content-Type": CONTENT_TYPE}
    ) as resp:
        assert resp.status == 413


async def test_big_backlog_is_split_and_oversized_message_dropped(http: HttpCluster) -> None:
    a, b = await http.full_mesh("a", "b", max_body_bytes=2000)
    big = SnapshotRequest(term=1, src="a", dst="b",
                          snapshot=Snapshot(SnapshotMeta(1, 1, ("a", "b")), b"x" * 5000))
    msgs: list[Message] = [
        AppendRequest(term=1, src="a", dst="b", prev_index=i, prev_term=1, commit=i,
                      entries=(Entry(i + 1, 1, data=b"y" * 100),))
        for i in range(40)
    ]
    a.transport.send([*msgs[:20], big, *msgs[20:]])
    await eventually(lambda: len(b.received) == 40)
    assert b.received == msgs
    assert len(b.batches) >= 3  # 40 * ~120 bytes cannot fit in 2000-byte bodies
    assert a.transport.stats.dropped == 1


async def test_failing_peer_is_backed_off(http: HttpCluster) -> None:
    hits = 0

    async def unavailable(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get(RAFT_STREAM_PATH, unavailable)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        a = await http.add("a", backoff_base=0.05, backoff_max=1.0)
        a.transport.set_peers({"x": url})
        for i in range(100):  # one heartbeat every 10 ms for 1 s
            a.transport.send([hb("a", "x", i)])
            await asyncio.sleep(0.01)
        # Without backoff: ~100 requests. With it: 0, .05, .15, .35, .75 s (+jitter).
        assert 3 <= hits <= 10
        assert a.transport.stats.sent == 0
    finally:
        await runner.cleanup()


async def test_one_socket_per_peer_carries_every_batch(http: HttpCluster) -> None:
    a, b = await http.full_mesh("a", "b")
    for i in range(1, 51):
        a.transport.send([hb("a", "b", i)])
        await asyncio.sleep(0.001)
    await eventually(lambda: b.commits_from("a") == list(range(1, 51)))
    assert isinstance(a.transport, HttpTransport) and isinstance(b.transport, HttpTransport)
    assert a.transport.open_sockets() == (1, 0)
    assert b.transport.open_sockets() == (0, 1)
    assert a.transport.stats.sent == 50 and a.transport.stats.failed_requests == 0


async def test_a_frame_the_peer_refuses_closes_the_socket(http: HttpCluster) -> None:
    b = await http.add("b", secret="pw")
    headers = {SECRET_HEADER: "pw", FROM_HEADER: "a"}
    async with aiohttp.ClientSession() as s:
        for frame in (encode_batch([hb("a", "c")]), encode_batch([hb("z", "b")]), b"\x93xx"):
            async with s.ws_connect(b.url + RAFT_STREAM_PATH, headers=headers) as ws:
                await ws.send_bytes(encode_batch([hb("a", "b", 1)]))  # delivered
                await ws.send_bytes(frame)
                closing = await ws.receive(timeout=WAIT)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await s.ws_connect(b.url + RAFT_STREAM_PATH, headers={SECRET_HEADER: "no"})
        assert caught.value.status == 401
    assert b.commits_from("a") == [1, 1, 1]
    assert b.transport.stats.rejected == 4


async def serve_on(port: int, got: list[list[Message]]) -> tuple[HttpTransport, web.AppRunner]:
    """A node "b" on `port` (a peer coming up, or back) that records what it gets."""
    transport = HttpTransport("b", {}, got.append)
    app = web.Application()
    app.add_routes(raft_routes(transport))
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return transport, runner


async def keeps_sending_until_received(a: Node, got: list[list[Message]]) -> bool:
    """Send heartbeats to "b" as Raft does, until one gets through (at most 2 s)."""
    for i in range(2, 200):
        a.transport.send([hb("a", "b", i)])
        await asyncio.sleep(0.01)
        if got:
            return True
    return False


async def test_a_restarted_peer_gets_a_new_socket(http: HttpCluster) -> None:
    a, b = await http.full_mesh("a", "b", backoff_max=0.1)
    a.transport.send([hb("a", "b", 1)])
    await eventually(lambda: b.commits_from("a") == [1])
    port = int(b.url.rsplit(":", 1)[1])
    await http.stop(b)  # closes its end of a's socket
    got: list[list[Message]] = []
    b2, runner = await serve_on(port, got)
    try:
        assert await keeps_sending_until_received(a, got)  # through a new socket
        assert b2.open_sockets() == (0, 1)
    finally:
        await b2.close()
        await runner.cleanup()


async def test_closing_a_transport_closes_the_sockets_into_it_at_once(http: HttpCluster) -> None:
    a, b = await http.full_mesh("a", "b")
    a.transport.send([hb("a", "b", 1)])
    await eventually(lambda: b.commits_from("a") == [1])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await b.transport.close()
    assert loop.time() - started < 1.0
    assert isinstance(a.transport, HttpTransport)
    await eventually(lambda: a.transport.open_sockets() == (0, 0))  # type: ignore[union-attr]


async def test_refused_connection_recovers_when_peer_comes_up(http: HttpCluster) -> None:
    a = await http.add("a", backoff_max=0.2)
    port = free_port()
    a.transport.set_peers({"b": f"http://127.0.0.1:{port}"})
    a.transport.send([hb("a", "b", 1)])
    await eventually(lambda: a.transport.stats.failed_requests >= 1)

    got: list[list[Message]] = []
    b, runner = await serve_on(port, got)
    try:
        assert await keeps_sending_until_received(a, got)
    finally:
        await b.close()
        await runner.cleanup()


async def test_routes_before_transport_exists_answer_503() -> None:
    class NodeLike:
        transport: HttpTransport | None = None

    holder = NodeLike()
    app = web.Application()
    attach(app, holder)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    got: list[list[Message]] = []
    try:
        status, payload = await post(url, encode_batch([hb("a", "b")]),
                                     {"Content-Type": CONTENT_TYPE})
        assert status == 503 and payload["error"]["code"] == "unavailable"
        holder.transport = HttpTransport("b", {}, got.append)
        status, _ = await post(url, encode_batch([hb("a", "b")]),
                               {"Content-Type": CONTENT_TYPE})
        assert status == 204 and got == [[hb("a", "b")]]
    finally:
        if holder.transport is not None:
            await holder.transport.close()
        await runner.cleanup()


def test_bad_peer_urls_are_rejected_and_keep_the_old_book() -> None:
    t = HttpTransport("a", {"b": "http://127.0.0.1:1"}, lambda b: None)
    for bad in ("127.0.0.1:80", "ftp://127.0.0.1", "http://", "http://h:1/?q=1"):
        with pytest.raises(ValueError):
            t.set_peers({"b": "http://127.0.0.1:2", "c": bad})
    t.send([hb("a", "b")])
    assert t.queue_length("b") == 1 and t.queue_length("c") == 0


def test_secret_must_fit_in_a_header() -> None:
    with pytest.raises(ValueError):
        HttpTransport("a", {}, lambda b: None, secret="line\nbreak")


# --- memory-only fault hooks ------------------------------------------------------------


async def test_memory_partition_and_heal() -> None:
    net = InMemoryNetwork()
    got: dict[str, list[Message]] = {n: [] for n in "abc"}
    urls = {n: net.address(n) for n in "abc"}
    ts = {n: net.transport(n, urls, got[n].extend) for n in "abc"}
    for t in ts.values():
        await t.start()
    try:
        net.partition({"a"}, {"b", "c"})
        ts["a"].send([hb("a", "b"), hb("a", "c")])
        ts["b"].send([hb("b", "c"), hb("b", "a")])
        await asyncio.sleep(0.01)
        assert got["a"] == [] and got["b"] == [] and got["c"] == [hb("b", "c")]

        net.heal()
        net.drop_filter = lambda m: m.src == "c"
        ts["a"].send([hb("a", "b")])
        ts["c"].send([hb("c", "b")])
        await asyncio.sleep(0.01)
        assert got["b"] == [hb("a", "b")]

        net.drop_filter = None
        net.isolate("b", "abc")
        ts["a"].send([hb("a", "b"), hb("a", "c", 5)])
        await asyncio.sleep(0.01)
        assert got["b"] == [hb("a", "b")] and got["c"][-1] == hb("a", "c", 5)
    finally:
        for t in ts.values():
            await t.close()


def test_queue_drops_oldest_first() -> None:
    q = BoundedMessageQueue(max_messages=3)
    dropped = q.extend(hb("a", "b", i) for i in range(5))
    assert dropped == 2
    assert [m.commit for m in q.take_all() if isinstance(m, AppendRequest)] == [2, 3, 4]
    assert len(q) == 0


def test_queue_byte_cap_keeps_a_lone_oversized_message() -> None:
    q = BoundedMessageQueue(max_messages=100, max_bytes=1000)
    big = SnapshotRequest(term=1, src="a", dst="b",
                          snapshot=Snapshot(SnapshotMeta(1, 1, ()), b"x" * 5000))
    assert q.push(hb("a", "b")) == 0
    assert q.push(big) == 1  # evicts the heartbeat, keeps itself
    assert q.take_all() == [big]
