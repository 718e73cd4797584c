"""CallBatcher: calls queued in one loop turn leave as one request, answers come back in
order, and a failure says whether any call in the batch may have run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from aiohttp import web

from service.transport.calls import CALLS_PATH, CONTENT_TYPE, CallBatcher
from service.transport.forward import ForwardError
from service.transport.http import FROM_HEADER, SECRET_HEADER
from tests.transport.test_forward import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BATCH: web.RequestKey[list[Any]] = web.RequestKey("batch", list)


class Peer:
    """A stand-in leader: records every batch it is sent and answers through handler."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.batches: list[list[Any]] = []
        self.headers: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        request[BATCH] = msgpack.unpackb(await request.read(), raw=False)
        self.batches.append(request[BATCH])
        self.headers.append(dict(request.headers))
        assert self.handler is not None
        return await self.handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(CALLS_PATH, self._serve)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _echo(peer: Peer) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        batch = request[BATCH]
        frames = [msgpack.packb([i, 200, {"call": name, "n": args["n"]}])
                  for i, (name, args) in enumerate(batch)]
        return web.Response(body=b"".join(frames), content_type=CONTENT_TYPE)

    return handler


def _echo_after(wait: Callable[[], Awaitable[object]]) -> Callable[[Peer], Handler]:
    """Echo, but only once `wait()` returns (an event set, a delay run out)."""

    def factory(peer: Peer) -> Handler:
        echo = _echo(peer)

        async def handler(request: web.Request) -> web.StreamResponse:
            await wait()
            return await echo(request)

        return handler

    return factory


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


async def _peer(peers: list[Peer], handler: Callable[[Peer], Handler] = _echo) -> Peer:
    peer = Peer()
    peer.handler = handler(peer)
    await peer.start()
    peers.append(peer)
    return peer


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
    with pytest.raises(ForwardError) as caught:
        await batcher.call(f"http://127.0.0.1:{free_port()}", "op", {"n": 1})
    assert caught.value.maybe_applied is False


async def test_a_connection_dropped_after_sending_means_maybe_applied(
    batcher: CallBatcher, peers: list[Peer]
) -> None:
    def drop(peer: Peer) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            request.transport.close()
            return web.Response()

        return handler

    peer = await _peer(peers, drop)
    calls = [batcher.call(peer.url, "op", {"n": i}) for i in range(3)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, ForwardError) and o.maybe_applied for o in outcomes), outcomes


async def test_a_refused_batch_ran_nothing(batcher: CallBatcher, peers: list[Peer]) -> None:
    def refuse(peer: Peer) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=401, text="bad cluster secret")

        return handler

    peer = await _peer(peers, refuse)
    with pytest.raises(ForwardError) as caught:
        await batcher.call(peer.url, "op", {"n": 1})
    assert caught.value.maybe_applied is False


@pytest.mark.parametrize("answer", [b"", msgpack.packb([5, 200, {}]), msgpack.packb([200, {}])])
async def test_a_missing_or_malformed_answer_is_an_unknown_outcome(
    batcher: CallBatcher, peers: list[Peer], answer: bytes
) -> None:
    def short(peer: Peer) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(body=answer, content_type=CONTENT_TYPE)

        return handler

    peer = await _peer(peers, short)
    with pytest.raises(ForwardError) as caught:
        await batcher.call(peer.url, "op", {"n": 1})
    assert caught.value.maybe_applied is True


async def test_answers_stream_in_as_they_finish(batcher: CallBatcher, peers: list[Peer]) -> None:
    """A slow call must not hold back a fast one of the same batch (a publish waiting
    on replication would otherwise hold back the replication it waits for)."""
    release = asyncio.Event()

    def second_first(peer: Peer) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
            await response.prepare(request)
            await response.write(msgpack.packb([1, 200, "fast"]))
            await release.wait()
            await response.write(msgpack.packb([0, 200, "slow"]))
            await response.write_eof()
            return response

        return handler

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
    def half(peer: Peer) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
            await response.prepare(request)
            await response.write(msgpack.packb([0, 200, "done"]))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response

        return handler

    peer = await _peer(peers, half)
    first = batcher.call(peer.url, "op", {"n": 0})
    second = batcher.call(peer.url, "op", {"n": 1})
    got = await asyncio.gather(first, second, return_exceptions=True)
    assert got[0] == (200, "done")
    assert isinstance(got[1], ForwardError) and got[1].maybe_applied


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

    def stuck(peer: Peer) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            await hold.wait()
            return web.Response()

        return handler

    peer = await _peer(peers, stuck)
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

    def stuck_unless_replication(peer: Peer) -> Handler:
        echo = _echo(peer)

        async def handler(request: web.Request) -> web.StreamResponse:
            if request[BATCH][0][0] != "replicate":
                await release.wait()
            return await echo(request)

        return handler

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
