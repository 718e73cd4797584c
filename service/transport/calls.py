"""Batched calls from a follower to the leader: many client requests, one peer request.

Forwarding each client request to the leader as its own HTTP request costs both nodes a
full HTTP exchange per request; under load that was most of a follower's CPU. A
follower instead queues each quick call (name + JSON-able args) for the leader, and
whatever queued in the same loop turn leaves together as one msgpack POST to
`CALLS_PATH`; the receiver runs them concurrently and streams each answer back as
`[index, status, body]` when it is ready, so no call waits for a slower one of its batch.
A batch holds its connection until its last answer, so long calls (a blocking lock wait)
travel in a lane of their own, with its own connections, in-flight limit and a timeout
as long as the longest wait in the batch.

Failure semantics are those of `LeaderClient.forward`: `ForwardError.maybe_applied` is
False only when the batch certainly never reached the leader (the connection could not
be opened); a timeout or a dropped connection after sending leaves every call in the
batch with an unknown outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack

from service.transport.forward import ForwardError
from service.transport.http import FROM_HEADER, SECRET_HEADER
from service.transport.sessions import client_session

log = logging.getLogger(__name__)

CALLS_PATH = "/internal/v1/calls"
CONTENT_TYPE = "application/x-msgpack"
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_MAX_BATCH = 256


@dataclass(slots=True)
class _Call:
    name: str
    args: Mapping[str, Any]
    future: asyncio.Future[tuple[int, Any]]
    timeout: float


@dataclass(slots=True)
class _Peer:
    url: str
    lane: str
    queued: list[_Call] = field(default_factory=list)
    in_flight: int = 0
    flush_scheduled: bool = False


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
        self._on_batch = on_batch
        self._peers: dict[tuple[str, str], _Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # One connection pool per lane: a lane of long waits must not hold the
        # connections another lane needs.
        self._sessions: dict[str, aiohttp.ClientSession] = {}
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
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

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

    async def _send(self, peer: _Peer, batch: list[_Call]) -> None:
        try:
            await self._post(peer, batch)
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

    async def _post(self, peer: _Peer, batch: list[_Call]) -> None:
        """Send the batch and settle each call as its answer streams in, `[i, status,
        body]` in the order they finish; raises ForwardError for the calls left."""
        body = msgpack.packb([[c.name, c.args] for c in batch], use_bin_type=True)
        headers = {"Content-Type": CONTENT_TYPE, FROM_HEADER: self.node_id}
        if self._secret is not None:
            headers[SECRET_HEADER] = self._secret
        url = peer.url
        timeout = aiohttp.ClientTimeout(
            total=max(call.timeout for call in batch), connect=self._connect_timeout
        )
        answered = 0
        try:
            async with self._session_for(peer.lane).post(
                url.rstrip("/") + CALLS_PATH, data=body, headers=headers, timeout=timeout
            ) as response:
                if response.status != 200:
                    # Refused as a whole (bad secret, node starting, malformed batch):
                    # nothing in it ran. Only an unexpected server error leaves the
                    # outcome open.
                    raise ForwardError(
                        f"{url} refused the call batch: {response.status}",
                        maybe_applied=response.status >= 500 and response.status != 503,
                    )
                unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
                async for chunk in response.content.iter_any():
                    unpacker.feed(chunk)
                    for answer in unpacker:
                        index, status, reply = _parse_answer(answer, len(batch))
                        call = batch[index]
                        if not call.future.done():
                            call.future.set_result((status, reply))
                        answered += 1
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ForwardError(f"could not reach {url}: {exc}", maybe_applied=False) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ForwardError(f"{url}: {type(exc).__name__}: {exc}", maybe_applied=True) from exc
        except (ValueError, msgpack.UnpackException) as exc:
            raise ForwardError(f"{url}: malformed call answer: {exc}", maybe_applied=True) from exc
        if answered < len(batch):
            raise ForwardError(f"{url}: the batch ended before every answer", maybe_applied=True)

    def _session_for(self, lane: str) -> aiohttp.ClientSession:
        session = self._sessions.get(lane)
        if session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._limit(lane))
            session = self._sessions[lane] = client_session(connector=connector)
        return session


def _parse_answer(answer: Any, size: int) -> tuple[int, int, Any]:
    if not (
        isinstance(answer, list)
        and len(answer) == 3
        and isinstance(answer[0], int)
        and 0 <= answer[0] < size
        and isinstance(answer[1], int)
    ):
        raise ValueError(f"not an answer [index, status, body]: {answer!r:.200}")
    return answer[0], answer[1], answer[2]


def _fail(calls: list[_Call], exc: ForwardError) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)
