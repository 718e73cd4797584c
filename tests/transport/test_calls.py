"""CallBatcher: calls queued in one loop turn leave as one frame on the peer's socket,
answers come back as they finish, and a failure says whether any call in the batch may
have run. The stand-in peer below speaks the frames by hand so it can misbehave; the
tests at the end run the real peer side, `serve_call_socket`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from service.node import CALL_LANE_LIMITS
from service.transport.calls import CALLS_PATH, CallBatcher, serve_call_socket
from service.transport.forward import ForwardError
from service.transport.http import FROM_HEADER, SECRET_HEADER
from service.transport.streams import OpenStreams
from tests.transport.test_forward import free_port

# (peer, socket, batch id, calls) -> None: answers (or not) on the socket.
Handler = Callable[["Peer", web.WebSocketResponse, int, list[Any]], Awaitable[None]]


class Peer:
    """A stand-in peer: records every batch it is sent and answers through handler."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.refuse_with: int | None = None  # refuse the socket itself with this status
        self.batches: list[list[Any]] = []
        self.headers: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self.url = ""

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        if self.refuse_with is not None:
            return web.Response(status=self.refuse_with, text="refused")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        async for message in ws:
            batch_id, calls = msgpack.unpackb(message.data, raw=False)
            self.batches.append(calls)
            assert self.handler is not None
            # Each batch answered on its own, as the real peer does.
            task = asyncio.ensure_future(self.handler(self, ws, batch_id, calls))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(CALLS_PATH, self._serve)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for ws in self.sockets:
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()


def answer(batch_id: int, index: int | None, status: int, body: Any) -> bytes:
    return msgpack.packb([batch_id, index, status, body])


async def _echo(peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]) -> None:
    await ws.send_bytes(
        b"".join(
            answer(batch_id, i, 200, {"call": name, "n": args["n"]})
            for i, (name, args) in enumerate(calls)
        )
    )


async def _silent(peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]) -> None:
    return None  # never answers: a peer that is stuck, or cut off by a partition


def _echo_after(wait: Callable[[], Awaitable[object]]) -> Handler:
    """Echo, but only once `wait()` returns (an event set, a delay run out)."""

    async def handler(
        peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]
    ) -> None:
        await wait()
        await _echo(peer, ws, batch_id, calls)

    return handler


@pytest.fixture
async def batcher() -> AsyncIterator[CallBatcher]:
    b = CallBatcher("n2", secret="pw", timeout=2.0, max_in_flight=1)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    started: list[Peer] = []
    try:
        yield started
    finally:
        for peer in started:
            await peer.stop()


async def _peer(peers: list[Peer], handler: Handler = _echo) -> Peer:
    peer = Peer()
    peer.handler = handler
    await peer.start()
    peers.append(peer)
    return peer


async def _fails(batcher: CallBatcher, url: str, maybe_applied: bool) -> ForwardError:
    """One call to url fails, with the outcome `maybe_applied` says; the error."""
    with pytest.raises(ForwardError) as caught:
        await batcher.call(url, "op", {"n": 1})
    assert caught.value.maybe_applied is maybe_applied
    return caught.value


async def _answers_again(batcher: CallBatcher, peer: Peer) -> None:
    """The peer behaves again: the next call gets its echo."""
    peer.handler = _echo
    assert await batcher.call(peer.url, "op", {"n": 2}) == (200, {"call": "op", "n": 2})


async def test_calls_of_one_turn_travel_together_and_answer_in_order(
    batcher: CallBatcher, peers: list[Peer]
) -> None:
    peer = await _peer(peers)
    answers = await asyncio.gather(*(batcher.call(peer.url, "op", {"n": i}) for i in range(20)))
    assert answers == [(200, {"call": "op", "n": i}) for i in range(20)]
    assert len(peer.batches) == 1 and len(peer.batches[0]) == 20
    assert peer.headers[0][SECRET_HEADER] == "pw"
    assert peer.headers[0][FROM_HEADER] == "n2"


async def test_calls_queued_behind_a_batch_in_flight_form_the_next_batch(
    batcher: CallBatcher, peers: list[Peer]
) -> None:
    release = asyncio.Event()
    peer = await _peer(peers, _echo_after(release.wait))
    first = asyncio.ensure_future(batcher.call(peer.url, "op", {"n": 0}))
    await asyncio.sleep(0.1)  # the first batch is now waiting on the peer
    rest = [asyncio.ensure_future(batcher.call(peer.url, "op", {"n": i})) for i in (1, 2, 3)]
    await asyncio.sleep(0.05)
    assert len(peer.batches) == 1  # max_in_flight=1: the others wait, and gather
    release.set()
    assert (await first)[1]["n"] == 0
    assert [(await f)[1]["n"] for f in rest] == [1, 2, 3]
    assert [len(b) for b in peer.batches] == [1, 3]


async def test_an_unreachable_peer_means_never_applied(batcher: CallBatcher) -> None:
    await _fails(batcher, f"http://127.0.0.1:{free_port()}", maybe_applied=False)


async def test_a_connection_dropped_after_sending_means_maybe_applied(
    batcher: CallBatcher, peers: list[Peer]
) -> None:
    async def drop(peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]) -> None:
        await ws.close()

    peer = await _peer(peers, drop)
    calls = [batcher.call(peer.url, "op", {"n": i}) for i in range(3)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, ForwardError) and o.maybe_applied for o in outcomes), outcomes


@pytest.mark.parametrize("status", [401, 503])
async def test_a_refused_socket_ran_nothing(
    batcher: CallBatcher, peers: list[Peer], status: int
) -> None:
    peer = await _peer(peers)
    peer.refuse_with = status
    error = await _fails(batcher, peer.url, maybe_applied=False)
    assert str(status) in str(error)


@pytest.mark.parametrize(("status", "maybe_applied"), [(400, False), (503, False), (500, True)])
async def test_a_batch_refused_as_a_whole_ran_nothing_unless_the_peer_failed(
    batcher: CallBatcher, peers: list[Peer], status: int, maybe_applied: bool
) -> None:
    async def refuse(
        peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]
    ) -> None:
        await ws.send_bytes(answer(batch_id, None, status, "no"))

    peer = await _peer(peers, refuse)
    await _fails(batcher, peer.url, maybe_applied)
    await _answers_again(batcher, peer)  # on the same socket
    assert len(peer.headers) == 1


@pytest.mark.parametrize(
    "frame",
    [b"\xc1", msgpack.packb([1, 5, 200, {}]), msgpack.packb([200, {}]), "text"],
    ids=["not-msgpack", "index-out-of-range", "not-an-answer", "text-frame"],
)
async def test_a_malformed_answer_is_an_unknown_outcome_and_a_new_socket_follows(
    batcher: CallBatcher, peers: list[Peer], frame: bytes | str
) -> None:
    async def malformed(
        peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]
    ) -> None:
        if isinstance(frame, str):
            await ws.send_str(frame)
        else:
            await ws.send_bytes(frame)

    peer = await _peer(peers, malformed)
    await _fails(batcher, peer.url, maybe_applied=True)
    await _answers_again(batcher, peer)
    assert len(peer.headers) == 2  # the broken socket was replaced


async def test_an_unanswered_batch_times_out_as_an_unknown_outcome(peers: list[Peer]) -> None:
    batcher = CallBatcher("n2", timeout=0.2)
    try:
        peer = await _peer(peers, _silent)
        await _fails(batcher, peer.url, maybe_applied=True)
        # A late answer for the abandoned batch is ignored; the socket serves on.
        await _answers_again(batcher, peer)
        assert batcher.open_streams() == 1
    finally:
        await batcher.close()


async def test_answers_stream_in_as_they_finish(batcher: CallBatcher, peers: list[Peer]) -> None:
    """A slow call must not hold back a fast one of the same batch (a publish waiting
    on replication would otherwise hold back the replication it waits for)."""
    release = asyncio.Event()

    async def second_first(
        peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]
    ) -> None:
        await ws.send_bytes(answer(batch_id, 1, 200, "fast"))
        await release.wait()
        await ws.send_bytes(answer(batch_id, 0, 200, "slow"))

    peer = await _peer(peers, second_first)
    slow = asyncio.ensure_future(batcher.call(peer.url, "op", {"n": 0}))
    fast = asyncio.ensure_future(batcher.call(peer.url, "op", {"n": 1}))
    assert await asyncio.wait_for(fast, 2) == (200, "fast")
    assert not slow.done()
    release.set()
    assert await asyncio.wait_for(slow, 2) == (200, "slow")
    assert len(peer.batches) == 1


async def test_a_connection_lost_midway_keeps_the_answers_already_received(
    batcher: CallBatcher, peers: list[Peer]
) -> None:
    async def half(peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]) -> None:
        await ws.send_bytes(answer(batch_id, 0, 200, "done"))
        await asyncio.sleep(0.05)
        await ws.close()

    peer = await _peer(peers, half)
    first = batcher.call(peer.url, "op", {"n": 0})
    second = batcher.call(peer.url, "op", {"n": 1})
    got = await asyncio.gather(first, second, return_exceptions=True)
    assert got[0] == (200, "done")
    assert isinstance(got[1], ForwardError) and got[1].maybe_applied


async def test_a_peer_killed_with_batches_out_fails_them_all(peers: list[Peer]) -> None:
    """Batches of several lanes wait on the peer; it dies: each is an unknown outcome,
    at once rather than at its timeout."""
    hold = asyncio.Event()
    batcher = CallBatcher("n2", timeout=30.0)
    try:
        peer = await _peer(peers, _echo_after(hold.wait))
        calls = [
            asyncio.ensure_future(batcher.call(peer.url, "op", {"n": i}, lane=lane))
            for i, lane in enumerate(["default", "wait", "default"])
        ]
        await asyncio.sleep(0.1)
        assert batcher.open_streams() == 2
        await peer.stop()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert all(isinstance(o, ForwardError) and o.maybe_applied for o in outcomes), outcomes
        assert batcher.open_streams() == 0
    finally:
        await batcher.close()


async def test_args_msgpack_cannot_carry_fail_alone(
    batcher: CallBatcher, peers: list[Peer]
) -> None:
    peer = await _peer(peers)
    good = asyncio.ensure_future(batcher.call(peer.url, "op", {"n": 1}))
    with pytest.raises(ValueError, match="cannot be encoded"):
        await batcher.call(peer.url, "op", {"n": 2**70})
    assert await good == (200, {"call": "op", "n": 1})


async def test_close_fails_queued_calls_instead_of_leaving_them_hanging(
    peers: list[Peer],
) -> None:
    batcher = CallBatcher("n2", timeout=5.0, max_in_flight=1)
    hold = asyncio.Event()
    peer = await _peer(peers, _echo_after(hold.wait))
    calls = [asyncio.ensure_future(batcher.call(peer.url, "op", {"n": i})) for i in range(3)]
    await asyncio.sleep(0.1)
    await asyncio.wait_for(batcher.close(), 2)
    hold.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, ForwardError) for o in outcomes), outcomes
    with pytest.raises(ForwardError):
        await batcher.call(peer.url, "op", {"n": 9})


async def test_lanes_have_their_own_in_flight_limit(
    batcher: CallBatcher, peers: list[Peer]
) -> None:
    """With the default lane's one batch stuck, a call on another lane still goes."""
    release = asyncio.Event()

    async def stuck_unless_replication(
        peer: Peer, ws: web.WebSocketResponse, batch_id: int, calls: list[Any]
    ) -> None:
        if calls[0][0] != "replicate":
            await release.wait()
        await _echo(peer, ws, batch_id, calls)

    peer = await _peer(peers, stuck_unless_replication)
    publish = asyncio.ensure_future(batcher.call(peer.url, "publish", {"n": 0}))
    await asyncio.sleep(0.05)
    assert await asyncio.wait_for(
        batcher.call(peer.url, "replicate", {"n": 1}, lane="replication"), 2
    ) == (200, {"call": "replicate", "n": 1})
    assert not publish.done()
    release.set()
    assert await publish == (200, {"call": "publish", "n": 0})


async def test_every_batch_is_reported_with_its_lane_and_size(peers: list[Peer]) -> None:
    seen: list[tuple[str, int]] = []
    batcher = CallBatcher("n2", on_batch=lambda lane, calls: seen.append((lane, calls)))
    try:
        peer = await _peer(peers)
        await asyncio.gather(*(batcher.call(peer.url, "op", {"n": i}) for i in range(5)))
        await batcher.call(peer.url, "op", {"n": 9}, lane="replication")
    finally:
        await batcher.close()
    assert seen == [("default", 5), ("replication", 1)]


async def test_a_batch_waits_as_long_as_its_longest_call(peers: list[Peer]) -> None:
    """A blocking lock wait may take its whole wait_ms: its batch gets that long, where
    a call with the default timeout is given up on (an unknown outcome)."""
    batcher = CallBatcher("n2", timeout=0.2)
    try:
        peer = await _peer(peers, _echo_after(lambda: asyncio.sleep(0.5)))
        assert await batcher.call(peer.url, "op", {"n": 1}, lane="wait", timeout=3.0) == (
            200, {"call": "op", "n": 1},
        )  # fmt: skip
        with pytest.raises(ForwardError) as caught:
            await batcher.call(peer.url, "op", {"n": 2})
        assert caught.value.maybe_applied is True
    finally:
        await batcher.close()


async def test_a_lane_may_have_its_own_in_flight_limit(peers: list[Peer]) -> None:
    release = asyncio.Event()
    batcher = CallBatcher("n2", max_in_flight=1, lane_limits={"wait": 3})
    try:
        peer = await _peer(peers, _echo_after(release.wait))
        calls = []
        for i in range(4):  # one per loop turn: each would be a batch of its own
            calls.append(asyncio.ensure_future(batcher.call(peer.url, "op", {"n": i}, lane="wait")))
            await asyncio.sleep(0.05)
        assert len(peer.batches) == 3  # the fourth waits for a free slot
        release.set()
        assert [(await c)[1]["n"] for c in calls] == [0, 1, 2, 3]
        assert len(peer.batches) == 4
    finally:
        await batcher.close()
    with pytest.raises(ValueError):
        CallBatcher("n2", lane_limits={"wait": 0})


async def test_one_socket_per_peer_and_lane_is_opened_once_and_reused(
    peers: list[Peer],
) -> None:
    batcher = CallBatcher("n2")
    try:
        peer = await _peer(peers)
        for _ in range(3):
            await asyncio.gather(
                *(batcher.call(peer.url, "op", {"n": i}, lane=lane)
                  for i in range(10) for lane in ("default", "wait"))
            )  # fmt: skip
        assert len(peer.headers) == 2
        assert len(peer.batches) == 6
    finally:
        await batcher.close()


# --- the real peer side ------------------------------------------------------------------


class Server:
    """serve_call_socket behind an application, running calls through `run`."""

    def __init__(
        self, run: Callable[[str, Any], Awaitable[tuple[int, Any]]], heartbeat: float = 4.0
    ) -> None:
        self.streams = OpenStreams()
        self.run = run
        self.heartbeat = heartbeat
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        return await serve_call_socket(
            request, self.run, self.streams, max_frame_bytes=1 << 20, heartbeat=self.heartbeat
        )

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_get(CALLS_PATH, self._serve)

        async def close_streams(_app: web.Application) -> None:
            await self.streams.close_all()

        app.on_shutdown.append(close_streams)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_the_peer_side_runs_calls_concurrently_and_answers_each_when_ready() -> None:
    release = asyncio.Event()
    seen: list[tuple[str, Any]] = []

    async def run(sender: str, call: Any) -> tuple[int, Any]:
        seen.append((sender, call))
        name, args = call
        if name == "slow":
            await release.wait()
        if name == "boom":
            raise RuntimeError("a bug")
        if name == "odd":
            return 200, {1j}  # msgpack cannot carry it
        return 200, {"n": args["n"]}

    batcher = CallBatcher("n2", timeout=5.0)
    try:
        async with Server(run) as server:
            slow = asyncio.ensure_future(batcher.call(server.url, "slow", {"n": 0}))
            fast = [asyncio.ensure_future(batcher.call(server.url, "op", {"n": i}))
                    for i in (1, 2)]  # fmt: skip
            assert [await asyncio.wait_for(f, 2) for f in fast] == [
                (200, {"n": 1}),
                (200, {"n": 2}),
            ]
            assert not slow.done()
            assert await batcher.call(server.url, "boom", {"n": 3}) == (
                500, "internal error; see the node's log",
            )  # fmt: skip
            assert (await batcher.call(server.url, "odd", {"n": 4}))[0] == 500
            release.set()
            assert await asyncio.wait_for(slow, 2) == (200, {"n": 0})
            assert {sender for sender, _ in seen} == {"n2"}
    finally:
        await batcher.close()


async def test_the_peer_side_refuses_a_malformed_batch_and_closes_on_garbage() -> None:
    async def run(sender: str, call: Any) -> tuple[int, Any]:
        return 200, call

    async with (
        Server(run) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(server.url + CALLS_PATH) as ws,
    ):
        await ws.send_bytes(msgpack.packb([7, "not a list"]))
        reply = msgpack.unpackb((await ws.receive(timeout=2)).data, raw=False)
        assert reply == [7, None, 400, "a call batch is a list of [name, args]"]
        await ws.send_bytes(msgpack.packb([8, [["x", {}]]]))
        assert msgpack.unpackb((await ws.receive(timeout=2)).data, raw=False) == [
                8, 0, 200, ["x", {}],
            ]  # fmt: skip
        await ws.send_bytes(b"\xc1")
        closing = await ws.receive(timeout=2)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.UNSUPPORTED_DATA


def _runs_until_cancelled(
    started: asyncio.Event, cancelled: asyncio.Event
) -> Callable[[str, Any], Awaitable[tuple[int, Any]]]:
    """The peer side of a call that runs (30 s) until cancelled, and says when it was."""

    async def run(sender: str, call: Any) -> tuple[int, Any]:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 200, None

    return run


async def test_calls_still_running_are_cancelled_when_the_caller_goes() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()
    batcher = CallBatcher("n2", timeout=30.0)
    async with Server(_runs_until_cancelled(started, cancelled)) as server:
        pending = asyncio.ensure_future(batcher.call(server.url, "op", {}))
        await asyncio.wait_for(started.wait(), 2)
        await batcher.close()
        await asyncio.wait_for(cancelled.wait(), 2)
        with pytest.raises(ForwardError):
            await pending


async def test_shutdown_closes_the_peer_sockets_at_once() -> None:
    async def run(sender: str, call: Any) -> tuple[int, Any]:
        return 200, None

    batcher = CallBatcher("n2")
    try:
        server = Server(run)
        await server.__aenter__()
        assert await batcher.call(server.url, "op", {}) == (200, None)
        assert len(server.streams) == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.__aexit__()
        assert loop.time() - started < 5  # not aiohttp's 60 s graceful timeout
        assert len(server.streams) == 0
        with pytest.raises(ForwardError) as caught:
            await batcher.call(server.url, "op", {})
        assert caught.value.maybe_applied is False  # nobody listens: never sent
    finally:
        await batcher.close()


async def test_a_peer_that_stops_answering_pings_is_dropped_and_its_calls_cancelled() -> None:
    """A peer that vanished without closing (its host gone) must not hold a handler and
    its running calls on this side for good."""
    cancelled = asyncio.Event()
    async with (
        Server(_runs_until_cancelled(asyncio.Event(), cancelled), heartbeat=0.2) as server,
        aiohttp.ClientSession() as session,
        # autoping off and never reading: pings go unanswered, as from a vanished host.
        session.ws_connect(server.url + CALLS_PATH, autoping=False) as ws,
    ):
        await ws.send_bytes(msgpack.packb([1, [["op", {}]]]))
        await asyncio.wait_for(cancelled.wait(), 5)
        assert len(server.streams) == 0


# --- probing a suspected peer ------------------------------------------------------------


async def test_a_probe_closes_a_silent_socket_and_fails_its_calls_at_once(
    peers: list[Peer],
) -> None:
    """A peer cut off by a partition: the socket stays open, nothing comes back. Without
    the probe the call would wait out its 30 s timeout."""

    batcher = CallBatcher("n2", timeout=30.0)
    try:
        peer = await _peer(peers, _silent)
        waiting = asyncio.ensure_future(batcher.call(peer.url, "op", {"n": 1}))
        await asyncio.sleep(0.05)
        assert batcher.open_streams() == 1 and not waiting.done()
        batcher.probe(peer.url, timeout=0.2)
        batcher.probe(peer.url, timeout=0.2)  # one probe per socket at a time
        with pytest.raises(ForwardError) as caught:
            await asyncio.wait_for(waiting, 2.0)
        assert caught.value.maybe_applied is True
        assert "ping" in str(caught.value)
        assert batcher.open_streams() == 0
        assert [calls[0][0] for calls in peer.batches] == ["op", "ping"]
        await _answers_again(batcher, peer)  # on a new socket
    finally:
        await batcher.close()


async def test_a_probe_leaves_a_live_peer_and_its_calls_alone() -> None:
    release = asyncio.Event()
    ran: list[Any] = []

    async def run(sender: str, call: Any) -> tuple[int, Any]:
        ran.append(call)
        await release.wait()
        return 200, call[1]

    batcher = CallBatcher("n2", timeout=5.0)
    try:
        async with Server(run) as server:
            waiting = asyncio.ensure_future(batcher.call(server.url, "op", {"n": 1}))
            await asyncio.sleep(0.05)
            batcher.probe(server.url, timeout=0.2)
            batcher.probe("http://127.0.0.1:1", timeout=0.2)  # no socket there: nothing
            await asyncio.sleep(0.4)
            assert batcher.open_streams() == 1 and not waiting.done()
            assert ran == [["op", {"n": 1}]]  # the peer answered the ping itself
            release.set()
            assert await asyncio.wait_for(waiting, 2.0) == (200, {"n": 1})
    finally:
        await batcher.close()


async def test_a_node_forwards_every_blocking_wait_however_many_are_waiting(
    peers: list[Peer],
) -> None:
    """Regression: a node kept at most 512 batches in flight on the wait lane, and a
    blocking wait holds its batch until granted. With more waiters than that arriving
    one by one through a follower, the rest stayed queued in the follower, never reaching
    the lock's queue, while the holder's release waited on them (found as a hang of
    `scale_bench.py hot-lock --waiters 2000`: 158 waiters never queued)."""
    release = asyncio.Event()
    batcher = CallBatcher("n2", lane_limits=CALL_LANE_LIMITS)
    try:
        peer = await _peer(peers, _echo_after(release.wait))
        calls = []
        for i in range(600):  # one per loop turn: each a batch of its own
            calls.append(asyncio.ensure_future(batcher.call(peer.url, "op", {"n": i}, lane="wait")))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        for _ in range(200):
            if sum(len(b) for b in peer.batches) == 600:
                break
            await asyncio.sleep(0.01)
        assert sum(len(b) for b in peer.batches) == 600, "every wait reached the leader"
        assert len(peer.batches) > 512
        release.set()
        assert [(await c)[1]["n"] for c in calls] == list(range(600))
    finally:
        await batcher.close()


async def test_a_burst_larger_than_a_batch_goes_out_whole_while_its_first_batch_waits(
    peers: list[Peer],
) -> None:
    """Regression: after taking a batch (256 calls) from a burst, the rest waited for
    that batch to finish, or for another call to arrive. A batch of blocking lock waits
    finishes only when every wait in it is granted, so the rest of a burst of waiters
    never reached the leader's lock queue: `scale_bench.py hot-lock --waiters 5000`
    hung with 750-1,070 waiters per follower stuck in it."""
    release = asyncio.Event()
    batcher = CallBatcher("n2", lane_limits=CALL_LANE_LIMITS)
    try:
        peer = await _peer(peers, _echo_after(release.wait))
        calls = [  # all in one loop turn
            asyncio.ensure_future(batcher.call(peer.url, "op", {"n": i}, lane="wait"))
            for i in range(700)
        ]
        for _ in range(200):
            if sum(len(b) for b in peer.batches) == 700:
                break
            await asyncio.sleep(0.01)
        assert sum(len(b) for b in peer.batches) == 700, "the whole burst reached the peer"
        assert max(len(b) for b in peer.batches) <= 256
        release.set()
        assert [(await c)[1]["n"] for c in calls] == list(range(700))
    finally:
        await batcher.close()
