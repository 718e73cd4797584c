"""Raft peer transport over HTTP (aiohttp): msgpack batches on a WebSocket per peer.

Client side: one sender task per peer keeps a WebSocket open to the peer's
`RAFT_STREAM_PATH` and drains everything queued for the peer into one frame (group send)
each time it wakes, so messages to one peer leave in order and a slow peer only ever
delays its own queue. A frame costs both nodes far less than an HTTP request did (see
streams.py); Raft needs no answer to a frame, since it retries what was lost itself.

Server side: `raft_routes(transport)` / `attach(app, transport)` add the receiving
handlers to an application the caller owns and runs: the socket, and `RAFT_PATH`, which
takes one batch per POST (for a sender without a socket: tools, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from service.raft.messages import Message, NodeId
from service.transport.codec import (
    BATCH_OVERHEAD,
    CodecError,
    decode_batch,
    encode_message,
    join_encoded,
)
from service.transport.protocols import (
    DEFAULT_MAX_QUEUE_BYTES,
    DEFAULT_MAX_QUEUE_MESSAGES,
    BoundedMessageQueue,
    OnMessages,
    TransportStats,
)
from service.transport.sessions import client_session
from service.transport.streams import (
    CLOSE_TIMEOUT_SECONDS,
    HEARTBEAT_SECONDS,
    SEND_ERRORS,
    OpenStreams,
    server_socket,
)

log = logging.getLogger(__name__)

RAFT_PATH = "/raft/v1/messages"
RAFT_STREAM_PATH = "/raft/v1/stream"
CONTENT_TYPE = "application/x-msgpack"
SECRET_HEADER = "X-Dsync-Secret"
FROM_HEADER = "X-Dsync-From"

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Close codes that say nothing is wrong with what we sent (the peer is stopping).
_NORMAL_CLOSE = frozenset({aiohttp.WSCloseCode.OK, aiohttp.WSCloseCode.GOING_AWAY})


def peer_endpoint(base_url: str) -> str:
    """The Raft socket URL of a peer given its base URL; ValueError if it is not
    http(s)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"peer URL must be http(s)://host[:port], got {base_url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"peer URL must not have a query or fragment: {base_url!r}")
    return base_url.rstrip("/") + RAFT_STREAM_PATH


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@dataclass(eq=False)
class _Peer:
    node_id: NodeId
    endpoint: str
    queue: BoundedMessageQueue
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    failures: int = 0  # consecutive failed requests; 0 means the peer looks up
    retry_at: float = 0.0  # loop time before which we do not try this peer again
    socket: aiohttp.ClientWebSocketResponse | None = None
    reader: asyncio.Task[None] | None = None


class _BodyTooLarge(Exception):
    pass


class HttpTransport:
    """Transport over HTTP; see protocols.Transport for the contract.

    `request_timeout` bounds a small request; large bodies (snapshots) get extra time at
    `min_bytes_per_second`, otherwise no snapshot above ~0.5 s of transfer could ever be
    delivered. `secret`, when set, is sent on every request and required on every
    incoming one.
    """

    def __init__(
        self,
        node_id: NodeId,
        peers: Mapping[NodeId, str],
        on_messages: OnMessages,
        *,
        secret: str | None = None,
        request_timeout: float = 0.5,
        connect_timeout: float = 0.25,
        min_bytes_per_second: float = 8 * 1024 * 1024,
        backoff_base: float = 0.05,
        backoff_max: float = 1.0,
        max_queue_messages: int = DEFAULT_MAX_QUEUE_MESSAGES,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        connections_per_peer: int = 2,
        body_read_timeout: float = 10.0,
        close_timeout: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if request_timeout <= 0 or connect_timeout <= 0 or min_bytes_per_second <= 0:
            raise ValueError("timeouts and throughput must be positive")
        if not 0 < backoff_base <= backoff_max:
            raise ValueError("need 0 < backoff_base <= backoff_max")
        if max_body_bytes <= BATCH_OVERHEAD:
            raise ValueError("max_body_bytes too small")
        self.node_id = node_id
        self.stats = TransportStats()
        self._on_messages = on_messages
        if secret is not None and not (secret and secret.isascii() and secret.isprintable()):
            # It travels in an HTTP header; reject what a header cannot carry now rather
            # than failing every request later.
            raise ValueError("cluster secret must be non-empty printable ASCII")
        self._secret_text = secret
        self._secret = secret.encode() if secret else None
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._min_bytes_per_second = min_bytes_per_second
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_queue_messages = max_queue_messages
        self._max_queue_bytes = max_queue_bytes
        self._max_body_bytes = max_body_bytes
        self._connections_per_peer = connections_per_peer
        self._body_read_timeout = body_read_timeout
        self._close_timeout = close_timeout
        self._rng = rng or random.Random()
        self._peers: dict[NodeId, _Peer] = {}
        # Sender tasks of removed peers: cancelled at once, awaited by close().
        self._retiring: set[asyncio.Future[Any]] = set()
        # Peers' sockets into this node, closed by close().
        self._server_streams = OpenStreams()
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self._closed = False
        self.set_peers(peers)

    # --- Transport: sending -------------------------------------------------------

    def send(self, messages: Sequence[Message]) -> None:
        if self._closed:
            self.stats.dropped += len(messages)
            return
        for m in messages:
            peer = self._peers.get(m.dst)
            if peer is None:
                # Unknown or ourselves. Raft never sends to itself, and a peer removed
                # by a membership change is legitimately unreachable.
                self.stats.dropped += 1
                continue
            self.stats.dropped += peer.queue.push(m)
            peer.wakeup.set()

    def set_peers(self, peers: Mapping[NodeId, str]) -> None:
        # Validate everything first so a bad URL leaves the old address book intact.
        endpoints = {n: peer_endpoint(url) for n, url in peers.items() if n != self.node_id}
        for gone in self._peers.keys() - endpoints.keys():
            peer = self._peers.pop(gone)
            self.stats.dropped += len(peer.queue.take_all())
            self._drop_socket(peer)
            if peer.task is not None:
                peer.task.cancel()
                self._retiring.add(peer.task)
                peer.task.add_done_callback(self._retiring.discard)
        for node, endpoint in endpoints.items():
            existing = self._peers.get(node)
            if existing is None:
                peer = _Peer(
                    node,
                    endpoint,
                    BoundedMessageQueue(self._max_queue_messages, self._max_queue_bytes),
                )
                self._peers[node] = peer
                if self._started and not self._closed:
                    self._start_sender(peer)
            elif existing.endpoint != endpoint:
                # A moved peer (restarted on a new port) deserves a fresh try at once.
                existing.endpoint = endpoint
                existing.failures = 0
                existing.retry_at = 0.0
                self._drop_socket(existing)

    def open_sockets(self) -> tuple[int, int]:
        """(sockets this node keeps to peers, peers' sockets into this node)."""
        out = sum(1 for p in self._peers.values() if p.socket is not None and not p.socket.closed)
        return out, len(self._server_streams)

    def queue_length(self, node: NodeId) -> int:
        peer = self._peers.get(node)
        return len(peer.queue) if peer is not None else 0

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("transport is closed")
        if self._started:
            return
        headers = {FROM_HEADER: self.node_id}
        if self._secret_text is not None:
            headers[SECRET_HEADER] = self._secret_text
        # One socket per peer; the spare connection covers one being torn down.
        connector = aiohttp.TCPConnector(limit_per_host=self._connections_per_peer)
        self._session = client_session(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(
                total=self._request_timeout, connect=self._connect_timeout
            ),
        )
        self._started = True
        for peer in self._peers.values():
            self._start_sender(peer)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for peer in self._peers.values():
            if peer.task is not None:
                peer.task.cancel()
            self._drop_socket(peer)
        tasks: list[asyncio.Future[Any]] = [
            p.task for p in self._peers.values() if p.task is not None
        ]
        tasks.extend(self._retiring)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._close_timeout)
            if pending:
                log.warning("%d transport tasks did not stop in time", len(pending))
        for peer in self._peers.values():
            peer.task = None
            self.stats.dropped += len(peer.queue.take_all())
        await self._server_streams.close_all()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _start_sender(self, peer: _Peer) -> None:
        peer.task = asyncio.create_task(
            self._run_sender(peer), name=f"dsync-transport-{self.node_id}->{peer.node_id}"
        )
        if peer.queue:
            peer.wakeup.set()  # messages sent before start()

    async def _run_sender(self, peer: _Peer) -> None:
        """Drain one peer's queue until cancelled (close() or the peer was removed)."""
        loop = asyncio.get_running_loop()
        while True:
            await peer.wakeup.wait()
            peer.wakeup.clear()
            # Bounded by the traffic: each round takes the whole queue.
            while peer.queue:
                delay = peer.retry_at - loop.time()
                if delay > 0:
                    # Backing off: the queue keeps accepting (bounded, oldest dropped)
                    # so the first request after the pause carries the newest messages.
                    await asyncio.sleep(min(delay, self._backoff_max))
                batch = peer.queue.take_all()
                try:
                    await self._send_batch(peer, batch)
                except Exception:
                    # A bug here must not silently kill the sender and partition the
                    # peer forever; log it and treat the batch as lost.
                    log.exception("sending to %s failed unexpectedly", peer.node_id)
                    self.stats.dropped += len(batch)
                    self._failed(peer, "internal error", loop.time())

    async def _send_batch(self, peer: _Peer, batch: list[Message]) -> None:
        loop = asyncio.get_running_loop()
        budget = self._max_body_bytes - BATCH_OVERHEAD
        bodies: list[list[bytes]] = []
        current: list[bytes] = []
        size = 0
        for m in batch:
            part = encode_message(m)
            if len(part) > budget:
                # Cannot ever be delivered under the receiver's body cap; the core must
                # send smaller snapshots/appends. Loud, because Raft would retry forever.
                log.error(
                    "dropping %s to %s: %d bytes exceeds max body %d",
                    type(m).__name__,
                    peer.node_id,
                    len(part),
                    self._max_body_bytes,
                )
                self.stats.dropped += 1
                continue
            if current and size + len(part) > budget:
                bodies.append(current)
                current, size = [], 0
            current.append(part)
            size += len(part)
        if current:
            bodies.append(current)

        for i, parts in enumerate(bodies):
            error = await self._deliver(peer, join_encoded(parts))
            if error is not None:
                # The peer is likely down: the rest would only wait for timeouts too.
                self.stats.dropped += sum(len(p) for p in bodies[i:])
                self._failed(peer, error, loop.time())
                return
            self.stats.sent += len(parts)
        if bodies:
            self._succeeded(peer)

    async def _deliver(self, peer: _Peer, body: bytes) -> str | None:
        """Write one frame on the peer's socket (opening it if need be); return None
        once it is written or a short reason for the log."""
        assert self._session is not None
        socket = peer.socket
        if socket is None or socket.closed:
            try:
                # The handshake gets a small request's time; connecting alone less, so
                # "could not connect" fails fast.
                async with asyncio.timeout(self._request_timeout):
                    socket = await self._session.ws_connect(
                        peer.endpoint,
                        heartbeat=HEARTBEAT_SECONDS,
                        max_msg_size=self._max_body_bytes,
                        timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_SECONDS),
                    )
            except aiohttp.WSServerHandshakeError as exc:
                return f"HTTP {exc.status} {exc.message}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return f"{type(exc).__name__}: {exc}"
            peer.socket = socket
            peer.reader = asyncio.create_task(self._read(peer, socket))
        try:
            # Written into the socket's buffer, or waiting for the peer to read when it
            # is full: a peer that stopped reading must not hold its sender forever.
            async with asyncio.timeout(
                self._request_timeout + len(body) / self._min_bytes_per_second
            ):
                await socket.send_bytes(body)
        except (*SEND_ERRORS, TimeoutError) as exc:
            self._drop_socket(peer)
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _read(self, peer: _Peer, socket: aiohttp.ClientWebSocketResponse) -> None:
        """The peer sends nothing on the socket but pongs and its closing frame; reading
        is what notices them. A socket the peer closes for a bad batch is a failure."""
        with contextlib.suppress(Exception):
            async for _ in socket:
                pass  # nothing is expected; a data frame is ignored
        if peer.socket is socket:
            peer.socket = None
            peer.reader = None
        code = socket.close_code
        if code is not None and code not in _NORMAL_CLOSE:
            self._failed(peer, f"peer closed the socket: {code}", asyncio.get_running_loop().time())

    def _drop_socket(self, peer: _Peer) -> None:
        socket, reader = peer.socket, peer.reader
        peer.socket = peer.reader = None
        if reader is not None:
            reader.cancel()
            self._retiring.add(reader)
            reader.add_done_callback(self._retiring.discard)
        if socket is not None and not socket.closed:
            closing = asyncio.ensure_future(socket.close())
            self._retiring.add(closing)
            closing.add_done_callback(self._retiring.discard)

    def _failed(self, peer: _Peer, reason: str, now: float) -> None:
        peer.failures += 1
        self.stats.failed_requests += 1
        # Exponential backoff with "equal jitter": at least half the step, so a down
        # peer is never hammered, and random in the upper half so the senders of many
        # nodes do not retry in lockstep when the peer comes back.
        step = min(self._backoff_max, self._backoff_base * 2 ** min(peer.failures - 1, 30))
        peer.retry_at = now + step / 2 + self._rng.uniform(0, step / 2)
        if peer.failures == 1:
            log.warning(
                "peer %s (%s) unreachable: %s; batch dropped, backing off",
                peer.node_id,
                peer.endpoint,
                reason,
            )
        else:
            log.debug("peer %s still unreachable (%d): %s", peer.node_id, peer.failures, reason)

    def _succeeded(self, peer: _Peer) -> None:
        if peer.failures:
            log.info("peer %s reachable again after %d failures", peer.node_id, peer.failures)
        peer.failures = 0
        peer.retry_at = 0.0

    # --- receiving ----------------------------------------------------------------

    async def handle_request(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for POST /raft/v1/messages: one batch, answered 204."""
        if self._closed:
            return error_response(503, "unavailable", "node is shutting down")
        if not self._authorized(request):
            self.stats.rejected += 1
            return error_response(401, "unauthorized", f"missing or wrong {SECRET_HEADER}")
        if request.content_type != CONTENT_TYPE:
            self.stats.rejected += 1
            return error_response(415, "unsupported_media_type", f"expected {CONTENT_TYPE}")
        declared = request.content_length
        if declared is not None and declared > self._max_body_bytes:
            self.stats.rejected += 1
            return error_response(413, "body_too_large", f"limit {self._max_body_bytes} bytes")
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            self.stats.rejected += 1
            return error_response(413, "body_too_large", f"limit {self._max_body_bytes} bytes")
        except TimeoutError:
            self.stats.rejected += 1
            return error_response(408, "request_timeout", "body not received in time")
        except Exception as exc:
            # Broken connection or malformed chunking (aiohttp raises several types):
            # nothing usable arrived, and the client is probably gone anyway.
            self.stats.rejected += 1
            log.debug("bad raft request body from %s: %r", request.remote, exc)
            return error_response(400, "bad_request", "could not read body")
        try:
            batch = decode_batch(body)
        except CodecError as exc:
            self.stats.rejected += 1
            return error_response(400, "bad_request", f"malformed batch: {exc}")
        refused = self._refusal(batch, request.headers.get(FROM_HEADER))
        if refused is not None:
            self.stats.rejected += 1
            return error_response(400, *refused)
        if not self._hand_over(batch):
            return error_response(500, "internal", "node failed to accept messages")
        return web.Response(status=204)

    def _hand_over(self, batch: list[Message]) -> bool:
        """Give an accepted batch to the node; False if it failed to take it."""
        if not batch:
            return True
        self.stats.received += len(batch)
        try:
            self._on_messages(batch)
        except Exception:
            log.exception("on_messages failed for a batch of %d", len(batch))
            return False
        return True

    def _refusal(self, batch: list[Message], sender: str | None) -> tuple[str, str] | None:
        """Why a decoded batch must not be delivered, as (code, message), or None."""
        for m in batch:
            if m.dst != self.node_id:
                # The sender's address book maps another node id to our address
                # (stale after a restart on another port?). Delivering would corrupt
                # Raft state, so refuse the whole batch.
                return "wrong_node", f"message for {m.dst[:64]!r} sent to {self.node_id!r}"
        if sender is not None and any(m.src != sender for m in batch):
            return "bad_request", f"message src differs from {FROM_HEADER}"
        return None

    def _authorized(self, request: web.Request) -> bool:
        if self._secret is None:
            return True
        given = request.headers.get(SECRET_HEADER, "")
        # compare_digest: the time taken must not reveal how much of the secret matched.
        # surrogateescape: aiohttp maps undecodable header bytes to surrogates, which
        # plain encode() would turn into a 500.
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._secret)

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for GET /raft/v1/stream: a peer's socket, one batch a frame.

        A frame that cannot be delivered (malformed, for another node) closes the
        socket with the reason, which the sender logs and backs off on."""
        if self._closed:
            return error_response(503, "unavailable", "node is shutting down")
        if not self._authorized(request):
            self.stats.rejected += 1
            return error_response(401, "unauthorized", f"missing or wrong {SECRET_HEADER}")
        sender = request.headers.get(FROM_HEADER)
        ws = server_socket(self._max_body_bytes)
        await ws.prepare(request)
        with self._server_streams.track(ws):
            async for frame in ws:
                if frame.type is not aiohttp.WSMsgType.BINARY:
                    break
                try:
                    batch = decode_batch(frame.data)
                except CodecError as exc:
                    refused: tuple[str, str] | None = ("bad_request", f"malformed batch: {exc}")
                else:
                    refused = self._refusal(batch, sender)
                if refused is not None:
                    self.stats.rejected += 1
                    code, message = refused
                    await ws.close(
                        code=aiohttp.WSCloseCode.POLICY_VIOLATION,
                        message=f"{code}: {message}"[:120].encode(),
                    )
                    break
                self._hand_over(batch)  # a failure is logged; Raft re-sends
        return ws

    async def _read_body(self, request: web.Request) -> bytes:
        # Read the stream ourselves: request.read() obeys the application's
        # client_max_size (1 MiB by default), which belongs to the API owner, while
        # snapshots need their own, larger cap.
        chunks: list[bytes] = []
        total = 0
        async with asyncio.timeout(self._body_read_timeout):
            # Bounded: every round consumes >= 1 byte and total is capped.
            while chunk := await request.content.readany():
                total += len(chunk)
                if total > self._max_body_bytes:
                    raise _BodyTooLarge
                chunks.append(chunk)
        return b"".join(chunks)


class TransportHolder(Protocol):
    """Anything exposing the node's transport once it exists (e.g. the Node object).

    The HTTP server starts before Raft (so /health answers early); until the transport
    is there, peers get a 503 and simply retry.
    """

    @property
    def transport(self) -> HttpTransport | None: ...


def raft_routes(target: HttpTransport | TransportHolder) -> list[web.RouteDef]:
    """Routes to add to an existing application: app.add_routes(raft_routes(t))."""

    def current() -> HttpTransport | None:
        return target if isinstance(target, HttpTransport) else target.transport

    async def handle(request: web.Request) -> web.StreamResponse:
        transport = current()
        if transport is None:
            return error_response(503, "unavailable", "node is starting")
        return await transport.handle_request(request)

    async def handle_stream(request: web.Request) -> web.StreamResponse:
        transport = current()
        if transport is None:
            return error_response(503, "unavailable", "node is starting")
        return await transport.handle_stream(request)

    return [web.post(RAFT_PATH, handle), web.get(RAFT_STREAM_PATH, handle_stream)]


def attach(app: web.Application, target: HttpTransport | TransportHolder) -> None:
    """Add the Raft message endpoint to `app` (before the app is started)."""
    app.add_routes(raft_routes(target))
