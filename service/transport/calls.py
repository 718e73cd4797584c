"""Batched calls between nodes: many client requests, one frame on a peer's WebSocket.

Forwarding each client request to the leader as its own HTTP request costs both nodes a
full HTTP exchange per request; under load that was most of a follower's CPU. A
follower instead queues each quick call (name + JSON-able args) for the leader, and
whatever queued in the same loop turn leaves together as one msgpack frame,
`[batch_id, [[name, args], ...]]`, on a WebSocket to `CALLS_PATH` that stays open (one
per peer and lane). The receiver runs the calls concurrently and sends each answer back
as `[batch_id, index, status, body]` when it is ready, answers finished together in one
frame, so no call waits for a slower one of its batch. A batch refused as a whole
(nothing of it ran) is answered `[batch_id, None, status, reason]`. Long calls (a
blocking lock wait) travel in a lane of their own, with its own socket, in-flight limit
and a timeout as long as the longest wait in the batch.

Failure semantics are those of `LeaderClient.forward`: `ForwardError.maybe_applied` is
False only when the batch certainly never reached the peer (the socket could not be
opened, or the peer refused the batch as a whole); a timeout or a socket lost after
sending leaves every call of the batch not yet answered with an unknown outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from service.transport.forward import ForwardError
from service.transport.http import FROM_HEADER, SECRET_HEADER
from service.transport.sessions import client_session
from service.transport.streams import (
    CLOSE_TIMEOUT_SECONDS,
    HEARTBEAT_SECONDS,
    SEND_ERRORS,
    OpenStreams,
    server_socket,
)

log = logging.getLogger(__name__)

CALLS_PATH = "/internal/v1/calls"  # GET, upgraded to a WebSocket
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_MAX_BATCH = 256
# Frames carry what clients sent and more (a cache store's image for its mirror, a
# queue partition for a follower that fell behind): the internal body cap.
DEFAULT_MAX_FRAME_BYTES = 512 * 1024 * 1024
MAX_CALLS_PER_BATCH = 1024
# A call every peer answers at once, without running anything: a liveness probe.
PING_CALL = "ping"
# How long a suspected peer's sockets have to answer a ping (see `CallBatcher.probe`).
PROBE_TIMEOUT_SECONDS = 0.5

# The peer's side of one call: (sending node id, [name, args]) -> (status, body).
RunCall = Callable[[str, Any], Awaitable[tuple[int, Any]]]


@dataclass(slots=True)
class _Call:
    name: str
    args: Mapping[str, Any]
    future: asyncio.Future[tuple[int, Any]]
    timeout: float


@dataclass(slots=True)
class _Batch:
    """A batch sent and not fully answered: `unanswered` holds the indexes still open."""

    calls: list[_Call]
    done: asyncio.Future[None]
    unanswered: set[int]


@dataclass(slots=True, eq=False)
class _Stream:
    """One open WebSocket to a peer (for one lane) and the batches waiting on it."""

    ws: aiohttp.ClientWebSocketResponse
    pending: dict[int, _Batch] = field(default_factory=dict)
    closed: bool = False
    reader: asyncio.Task[None] | None = None
    probing: bool = False
    broken: str | None = None  # why this side gave up on the socket, if it did


@dataclass(slots=True)
class _Peer:
    url: str
    lane: str
    queued: list[_Call] = field(default_factory=list)
    in_flight: int = 0
    flush_scheduled: bool = False
    stream: _Stream | None = None
    connecting: asyncio.Future[_Stream] | None = None


class CallBatcher:
    """Client side: `await call(url, name, args)` -> (status, body) from the node at url."""

    def __init__(
        self,
        node_id: str,
        *,
        secret: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        connect_timeout: float = 0.5,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        lane_limits: Mapping[str, int] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        """`lane_limits` overrides max_in_flight per lane (a lane of long waits needs
        more); `on_batch(lane, calls)` is told the size of every batch sent (metrics)."""
        limits = dict(lane_limits or {})
        if max_in_flight < 1 or max_batch < 1 or any(n < 1 for n in limits.values()):
            raise ValueError("in-flight limits and max_batch must be at least 1")
        self.node_id = node_id
        self._secret = secret or None
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_in_flight = max_in_flight
        self._lane_limits = limits
        self._max_batch = max_batch
        self._max_frame_bytes = max_frame_bytes
        self._on_batch = on_batch
        self._peers: dict[tuple[str, str], _Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def call(
        self,
        url: str,
        name: str,
        args: Mapping[str, Any],
        *,
        lane: str = "default",
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """Run call `name` on the node at base URL `url`; raises ForwardError.

        `timeout` bounds the call's batch (default: the batcher's); a batch waits for
        as long as its longest call may take.

        Each lane has its own batches and in-flight limit. A call that waits on calls
        made elsewhere (a publish waiting for replication) must not share a lane with
        those (replication): full lanes waiting on each other across nodes would stall
        until timeouts.
        """
        if self._closed:
            raise ForwardError("call batcher is closed", maybe_applied=False)
        # Fail here, for this call alone, if the args cannot travel (e.g. a JSON integer
        # wider than 64 bits): one bad call must not sink the batch it would join.
        try:
            msgpack.packb(args, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"call arguments cannot be encoded: {exc}") from exc
        peer = self._peers.get((url, lane))
        if peer is None:
            peer = self._peers[url, lane] = _Peer(url, lane)
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        peer.queued.append(_Call(name, args, future, timeout or self._timeout))
        self._schedule(peer)
        return await future

    def probe(self, url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
        """Suspect the node at `url` (it has just lost a leadership): each open socket
        to it must answer a ping within `timeout`, or it is closed, and the calls waiting
        on it fail at once with an unknown outcome (callers then retry what is
        idempotent elsewhere) instead of at their timeout. A node cut off by a network
        partition leaves its sockets open and silent, and the WebSocket heartbeat would
        notice only after seconds; a node that is merely slow answers and keeps them."""
        if self._closed:
            return
        for peer in list(self._peers.values()):
            stream = peer.stream
            if peer.url != url or stream is None or stream.closed or stream.probing:
                continue
            stream.probing = True
            task = asyncio.create_task(self._probe(peer, stream, timeout))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _probe(self, peer: _Peer, stream: _Stream, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        batch_id = next(self._ids)
        ping = _Call(PING_CALL, {}, loop.create_future(), timeout)
        waiting = _Batch([ping], loop.create_future(), {0})
        stream.pending[batch_id] = waiting
        try:
            await stream.ws.send_bytes(msgpack.packb([batch_id, [[PING_CALL, {}]]]))
            async with asyncio.timeout(timeout):
                await waiting.done
        except TimeoutError:
            reason = f"no answer to a ping within {timeout} s"
            log.warning(
                "closing a silent call socket",
                extra={"peer": peer.url, "lane": peer.lane, "reason": reason},
            )
            stream.broken = reason
            if stream.reader is not None:
                stream.reader.cancel()
        except (ForwardError, *SEND_ERRORS):
            pass  # the socket is closing anyway; its reader fails what waits on it
        finally:
            stream.pending.pop(batch_id, None)
            stream.probing = False

    def open_streams(self) -> int:
        """How many peer sockets are open now (tests, metrics)."""
        return sum(1 for p in self._peers.values() if p.stream is not None and not p.stream.closed)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for peer in self._peers.values():
            _fail(peer.queued, ForwardError("call batcher closed", maybe_applied=False))
            peer.queued.clear()
            if peer.connecting is not None:
                peer.connecting.cancel()
            stream = peer.stream
            if stream is not None and stream.reader is not None:
                stream.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stream.reader
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- batching ----------------------------------------------------------------

    def _limit(self, lane: str) -> int:
        return self._lane_limits.get(lane, self._max_in_flight)

    def _schedule(self, peer: _Peer) -> None:
        # Flush at the end of this loop turn, so every call queued in the turn joins.
        if not peer.flush_scheduled and peer.in_flight < self._limit(peer.lane):
            peer.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, peer)

    def _flush(self, peer: _Peer) -> None:
        peer.flush_scheduled = False
        if self._closed or not peer.queued or peer.in_flight >= self._limit(peer.lane):
            return
        batch = peer.queued[: self._max_batch]
        del peer.queued[: self._max_batch]
        peer.in_flight += 1
        if self._on_batch is not None:
            self._on_batch(peer.lane, len(batch))
        task = asyncio.create_task(self._send(peer, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if peer.queued:
            # More than a batch was queued: the rest go next turn, not when this batch
            # is done. A batch of blocking lock waits is done only when every wait in it
            # is, so the rest of a burst of waiters sat here, out of the lock's queue,
            # until then (2,000 waiters through 3 nodes: a few hundred never queued).
            self._schedule(peer)

    async def _send(self, peer: _Peer, batch: list[_Call]) -> None:
        try:
            await self._exchange(peer, batch)
        except ForwardError as exc:
            _fail(batch, exc)
        except asyncio.CancelledError:
            _fail(batch, ForwardError("call batcher closed", maybe_applied=True))
            raise
        except Exception as exc:  # a bug here must not leave callers hanging
            log.exception("call batch failed", extra={"peer": peer.url})
            _fail(batch, ForwardError(f"call batch failed: {exc!r}", maybe_applied=True))
        finally:
            peer.in_flight -= 1
            if peer.queued:
                self._schedule(peer)

    async def _exchange(self, peer: _Peer, batch: list[_Call]) -> None:
        """Send the batch on the peer's socket and wait until every call is answered
        (each is settled as its answer arrives); raises ForwardError for the rest."""
        stream = await self._stream(peer)
        batch_id = next(self._ids)
        waiting = _Batch(batch, asyncio.get_running_loop().create_future(), set(range(len(batch))))
        stream.pending[batch_id] = waiting
        try:
            frame = msgpack.packb([batch_id, [[c.name, c.args] for c in batch]], use_bin_type=True)
            try:
                await stream.ws.send_bytes(frame)
            except SEND_ERRORS as exc:
                # Some of the frame may have left: the outcome is unknown.
                raise ForwardError(
                    f"{peer.url}: sending a call batch failed: {exc!r}", maybe_applied=True
                ) from exc
            try:
                async with asyncio.timeout(max(call.timeout for call in batch)):
                    await waiting.done
            except TimeoutError as exc:
                raise ForwardError(
                    f"{peer.url}: the call batch was not answered in time", maybe_applied=True
                ) from exc
        finally:
            stream.pending.pop(batch_id, None)

    # --- the peer's socket ----------------------------------------------------------

    async def _stream(self, peer: _Peer) -> _Stream:
        """The peer's open socket, opened once for every batch that asks meanwhile;
        ForwardError (never applied) when it cannot be opened."""
        stream = peer.stream
        if stream is not None and not stream.closed:
            return stream
        if peer.connecting is None:
            connecting = peer.connecting = asyncio.ensure_future(self._connect(peer))
            connecting.add_done_callback(functools.partial(_connected, peer))
        return await asyncio.shield(peer.connecting)

    async def _connect(self, peer: _Peer) -> _Stream:
        if self._session is None:
            self._session = client_session(connector=aiohttp.TCPConnector(limit=0))
        headers = {FROM_HEADER: self.node_id}
        if self._secret is not None:
            headers[SECRET_HEADER] = self._secret
        try:
            # The handshake is bounded too: a peer whose loop is stuck must not hold
            # every batch for it.
            async with asyncio.timeout(self._connect_timeout * 4):
                ws = await self._session.ws_connect(
                    peer.url.rstrip("/") + CALLS_PATH,
                    headers=headers,
                    heartbeat=HEARTBEAT_SECONDS,
                    max_msg_size=self._max_frame_bytes,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_SECONDS),
                )
        except aiohttp.WSServerHandshakeError as exc:
            # Refused before any batch was sent (bad secret, node starting).
            raise ForwardError(
                f"{peer.url} refused the call socket: {exc.status} {exc.message}",
                maybe_applied=False,
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ForwardError(f"could not reach {peer.url}: {exc!r}", maybe_applied=False) from exc
        stream = _Stream(ws)
        stream.reader = asyncio.create_task(self._read(peer, stream))
        peer.stream = stream
        return stream

    async def _read(self, peer: _Peer, stream: _Stream) -> None:
        """Settle calls as their answers arrive; when the socket ends, every batch
        still waiting on it has an unknown outcome."""
        reason = "the connection closed"
        unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=False, max_buffer_size=self._max_frame_bytes
        )
        try:
            async for message in stream.ws:
                if message.type is not aiohttp.WSMsgType.BINARY:
                    reason = f"{message.type.name} frame {message.data!r:.200}"
                    break
                unpacker.feed(message.data)
                for answer in unpacker:
                    _settle(stream, answer)
            else:
                code = stream.ws.close_code
                reason = f"the peer closed the call socket ({code})"
        except (ValueError, msgpack.UnpackException) as exc:
            reason = f"malformed call answer: {exc}"
        except Exception as exc:
            reason = f"reading answers failed: {exc!r}"
        finally:
            reason = stream.broken or reason
            stream.closed = True
            if peer.stream is stream:
                peer.stream = None
            error = ForwardError(f"{peer.url}: {reason}", maybe_applied=True)
            for waiting in stream.pending.values():
                if not waiting.done.done():
                    waiting.done.set_exception(error)
            stream.pending.clear()
            with contextlib.suppress(*SEND_ERRORS):
                await stream.ws.close()
            log.debug("call socket closed", extra={"peer": peer.url, "reason": reason})


def _connected(peer: _Peer, connecting: asyncio.Future[_Stream]) -> None:
    peer.connecting = None
    if not connecting.cancelled():
        connecting.exception()  # retrieved: every waiter got it through the shield


def _settle(stream: _Stream, answer: Any) -> None:
    batch_id, index, status, body = _parse_answer(answer)
    waiting = stream.pending.get(batch_id)
    if waiting is None:
        return  # its sender gave up waiting (timeout): nobody to tell
    if index is None:
        # Refused as a whole (malformed, node not ready): nothing in it ran. Only an
        # unexpected server error leaves the outcome open.
        if not waiting.done.done():
            waiting.done.set_exception(
                ForwardError(
                    f"the call batch was refused: {status} {body!r:.200}",
                    maybe_applied=status >= 500 and status != 503,
                )
            )
        return
    if index >= len(waiting.calls):
        raise ValueError(f"answer for call {index} of a batch of {len(waiting.calls)}")
    if index in waiting.unanswered:
        waiting.unanswered.discard(index)
        call = waiting.calls[index]
        if not call.future.done():
            call.future.set_result((status, body))
        if not waiting.unanswered and not waiting.done.done():
            waiting.done.set_result(None)


def _parse_answer(answer: Any) -> tuple[int, int | None, int, Any]:
    if not (
        isinstance(answer, list)
        and len(answer) == 4
        and isinstance(answer[0], int)
        and (answer[1] is None or (isinstance(answer[1], int) and answer[1] >= 0))
        and isinstance(answer[2], int)
    ):
        raise ValueError(f"not an answer [batch, index, status, body]: {answer!r:.200}")
    return answer[0], answer[1], answer[2], answer[3]


def _fail(calls: list[_Call], exc: ForwardError) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)


# --- the peer's side -------------------------------------------------------------------


async def serve_call_socket(
    request: web.Request,
    run: RunCall,
    streams: OpenStreams,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    heartbeat: float = HEARTBEAT_SECONDS,
) -> web.WebSocketResponse:
    """Serve one peer's call socket: run the calls of every batch concurrently and send
    each answer as soon as it is ready (a call must never wait for a slower one of its
    batch: a publish waiting on replication must not hold back the replication it waits
    for). The caller has checked the peer's secret. When the socket closes the calls
    still running are cancelled: their answers have nowhere to go."""
    ws = server_socket(max_frame_bytes, heartbeat)
    await ws.prepare(request)
    sender = request.headers.get(FROM_HEADER, "")
    answers = _AnswerWriter(ws)
    running: set[asyncio.Future[tuple[int, Any]]] = set()
    try:
        with streams.track(ws):
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.BINARY:
                    break
                try:
                    batch_id, calls = _parse_batch(message.data)
                except ValueError as exc:
                    # Not even a batch id to answer to: the peer speaks another protocol.
                    await ws.close(
                        code=aiohttp.WSCloseCode.UNSUPPORTED_DATA, message=str(exc)[:100].encode()
                    )
                    break
                if calls is None:
                    answers.put(batch_id, None, (400, "a call batch is a list of [name, args]"))
                    continue
                for index, call in enumerate(calls):
                    if isinstance(call, list) and call and call[0] == PING_CALL:
                        answers.put(batch_id, index, (200, None))
                        continue
                    task: asyncio.Future[tuple[int, Any]] = asyncio.ensure_future(run(sender, call))
                    running.add(task)
                    task.add_done_callback(
                        functools.partial(_call_done, answers, running, batch_id, index)
                    )
    finally:
        for task in running:
            task.cancel()
        answers.stop()
    return ws


def _parse_batch(data: bytes) -> tuple[int, list[Any] | None]:
    """(batch id, calls), calls None when the batch is malformed; ValueError without a
    batch id."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed call batch: {exc}") from exc
    if not (isinstance(frame, list) and len(frame) == 2 and isinstance(frame[0], int)):
        raise ValueError("a call batch frame is [batch_id, calls]")
    calls = frame[1]
    if not isinstance(calls, list) or len(calls) > MAX_CALLS_PER_BATCH:
        return frame[0], None
    return frame[0], calls


def _call_done(
    answers: _AnswerWriter,
    running: set[asyncio.Future[tuple[int, Any]]],
    batch_id: int,
    index: int,
    task: asyncio.Future[tuple[int, Any]],
) -> None:
    running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("a call failed", exc_info=exc)
        answers.put(batch_id, index, (500, "internal error; see the node's log"))
    else:
        answers.put(batch_id, index, task.result())


class _AnswerWriter:
    """Sends answers in order of completion; those that finish together share a frame."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._parts: list[bytes] = []
        self._ready = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def put(self, batch_id: int, index: int | None, result: tuple[int, Any]) -> None:
        status, body = result
        try:
            part = msgpack.packb([batch_id, index, status, body], use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            log.error("a call answer cannot be encoded: %s", exc)
            part = msgpack.packb([batch_id, index, 500, "the answer could not be encoded"])
        self._parts.append(part)
        self._ready.set()

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            frame = b"".join(self._parts)
            self._parts.clear()
            try:
                await self._ws.send_bytes(frame)
            except SEND_ERRORS:
                return  # the peer is gone; its batches fail on its side
