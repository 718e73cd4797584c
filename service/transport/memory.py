"""An in-process network for tests: same contract as HttpTransport, no sockets.

Delivery is asynchronous (scheduled with loop.call_soon) so code under test sees the same
"send returns, message arrives later" behaviour as over HTTP, and everything sent to one
peer in one loop turn arrives as one batch, like the HTTP sender's group send.

Fault hooks (cut/isolate/partition/drop filter) act at delivery time, so a partition
installed while messages are in flight loses those messages, as a real one would.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

from service.raft.messages import Message, NodeId
from service.transport.protocols import (
    DEFAULT_MAX_QUEUE_BYTES,
    DEFAULT_MAX_QUEUE_MESSAGES,
    BoundedMessageQueue,
    OnMessages,
    TransportStats,
)

log = logging.getLogger(__name__)

MEMORY_SCHEME = "memory://"

DropFilter = Callable[[Message], bool]


class InMemoryNetwork:
    """Routes batches between InMemoryTransports by address, with link-level faults."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._endpoints: dict[str, InMemoryTransport] = {}
        self._cut: set[tuple[NodeId, NodeId]] = set()
        self._rng = rng or random.Random(0)
        # Fraction of messages dropped at random (seeded rng, so tests stay repeatable).
        self.drop_rate = 0.0
        # Return True to drop a message; lets a test target e.g. only AppendResponses.
        self.drop_filter: DropFilter | None = None

    @staticmethod
    def address(name: str) -> str:
        return MEMORY_SCHEME + name

    def transport(
        self,
        node_id: NodeId,
        peers: Mapping[NodeId, str],
        on_messages: OnMessages,
        *,
        address: str | None = None,
        max_queue_messages: int = DEFAULT_MAX_QUEUE_MESSAGES,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
    ) -> InMemoryTransport:
        """A transport for node_id reachable at `address` (default memory://<node_id>)
        once started. A restarted node can take a new address to mimic a moved peer."""
        return InMemoryTransport(
            self,
            node_id,
            peers,
            on_messages,
            address=address or self.address(node_id),
            max_queue_messages=max_queue_messages,
            max_queue_bytes=max_queue_bytes,
        )

    # --- fault injection ----------------------------------------------------------

    def cut(self, a: NodeId, b: NodeId, *, both_ways: bool = True) -> None:
        self._cut.add((a, b))
        if both_ways:
            self._cut.add((b, a))

    def restore(self, a: NodeId, b: NodeId, *, both_ways: bool = True) -> None:
        self._cut.discard((a, b))
        if both_ways:
            self._cut.discard((b, a))

    def isolate(self, node: NodeId, others: Iterable[NodeId]) -> None:
        """Cut `node` off from every node in `others`, both directions."""
        for other in others:
            if other != node:
                self.cut(node, other)

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Only nodes within the same group can talk; replaces earlier cuts."""
        sets = [set(g) for g in groups]
        self._cut.clear()
        for i, g in enumerate(sets):
            for other in sets[i + 1 :]:
                for a in g:
                    for b in other:
                        self.cut(a, b)

    def heal(self) -> None:
        """Remove every cut and random drop; the drop filter is left to its owner."""
        self._cut.clear()
        self.drop_rate = 0.0

    def is_cut(self, src: NodeId, dst: NodeId) -> bool:
        return (src, dst) in self._cut

    # --- plumbing used by InMemoryTransport ---------------------------------------

    def _bind(self, address: str, transport: InMemoryTransport) -> None:
        current = self._endpoints.get(address)
        if current is not None and current is not transport:
            raise RuntimeError(f"address already in use: {address}")
        self._endpoints[address] = transport

    def _unbind(self, address: str, transport: InMemoryTransport) -> None:
        if self._endpoints.get(address) is transport:
            del self._endpoints[address]

    def _deliver(self, src: NodeId, address: str, batch: list[Message]) -> int:
        """Hand a batch to whoever listens at `address`; return how many got through."""
        receiver = self._endpoints.get(address)
        if receiver is None:
            return 0  # nobody listening: like a refused connection
        if self.is_cut(src, receiver.node_id):
            return 0
        kept = [m for m in batch if not self._lost(m)]
        if not kept:
            return 0
        return len(kept) if receiver._receive(kept) else 0

    def _lost(self, m: Message) -> bool:
        if self.drop_filter is not None and self.drop_filter(m):
            return True
        return self.drop_rate > 0 and self._rng.random() < self.drop_rate


class InMemoryTransport:
    """Transport over an InMemoryNetwork; see protocols.Transport for the contract."""

    def __init__(
        self,
        network: InMemoryNetwork,
        node_id: NodeId,
        peers: Mapping[NodeId, str],
        on_messages: OnMessages,
        *,
        address: str,
        max_queue_messages: int = DEFAULT_MAX_QUEUE_MESSAGES,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
    ) -> None:
        self.network = network
        self.node_id = node_id
        self.address = address
        self.stats = TransportStats()
        self._on_messages = on_messages
        self._max_queue_messages = max_queue_messages
        self._max_queue_bytes = max_queue_bytes
        self._peers: dict[NodeId, str] = {}
        self._queues: dict[NodeId, BoundedMessageQueue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handles: dict[NodeId, asyncio.Handle] = {}
        self._closed = False
        self.set_peers(peers)

    # --- Transport ----------------------------------------------------------------

    def send(self, messages: Sequence[Message]) -> None:
        if self._closed:
            self.stats.dropped += len(messages)
            return
        for m in messages:
            queue = self._queues.get(m.dst)
            if queue is None:
                self.stats.dropped += 1  # unknown peer or ourselves
                continue
            self.stats.dropped += queue.push(m)
            self._schedule(m.dst)

    def set_peers(self, peers: Mapping[NodeId, str]) -> None:
        new = {n: url for n, url in peers.items() if n != self.node_id}
        for gone in self._peers.keys() - new.keys():
            self.stats.dropped += len(self._queues.pop(gone).take_all())
            handle = self._flush_handles.pop(gone, None)
            if handle is not None:
                handle.cancel()
        for node in new.keys() - self._peers.keys():
            self._queues[node] = BoundedMessageQueue(
                self._max_queue_messages, self._max_queue_bytes
            )
        self._peers = new

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("transport is closed")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.network._bind(self.address, self)
        # Messages sent before start() were queued; let them go now.
        for node, queue in self._queues.items():
            if queue:
                self._schedule(node)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._flush_handles.values():
            handle.cancel()
        self._flush_handles.clear()
        for queue in self._queues.values():
            self.stats.dropped += len(queue.take_all())
        self.network._unbind(self.address, self)

    # --- introspection --------------------------------------------------------------

    def queue_length(self, node: NodeId) -> int:
        queue = self._queues.get(node)
        return len(queue) if queue is not None else 0

    # --- internals ------------------------------------------------------------------

    def _schedule(self, node: NodeId) -> None:
        if self._loop is None or node in self._flush_handles:
            return  # not started yet, or a flush for this peer is already pending
        self._flush_handles[node] = self._loop.call_soon(self._flush, node)

    def _flush(self, node: NodeId) -> None:
        self._flush_handles.pop(node, None)
        queue = self._queues.get(node)
        if queue is None or self._closed:
            return
        batch = queue.take_all()
        if not batch:
            return
        delivered = self.network._deliver(self.node_id, self._peers[node], batch)
        self.stats.sent += delivered
        self.stats.dropped += len(batch) - delivered
        if delivered == 0:
            self.stats.failed_requests += 1

    def _receive(self, batch: list[Message]) -> bool:
        """Called by the network; mirrors the HTTP handler's checks."""
        if self._closed or self._loop is None:
            return False
        if any(m.dst != self.node_id for m in batch):
            # The sender's address book points a different node id at us: refuse the
            # whole batch, as the HTTP handler answers 400.
            self.stats.rejected += 1
            return False
        self.stats.received += len(batch)
        try:
            self._on_messages(batch)
        except Exception:
            log.exception("on_messages failed for a batch of %d", len(batch))
        return True
