"""The peer transport contract shared by the HTTP and the in-memory implementation.

Raft tolerates lost, duplicated and reordered messages and retries on its own (every
heartbeat re-sends what a follower is missing), so the transport is deliberately
fire-and-forget: `send()` never blocks and never raises for an unreachable peer; it drops.
What it must never do is stall the runner's loop behind a slow peer or grow memory
without bound, hence the per-peer bounded queue below that both implementations use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.raft.messages import (
    AppendRequest,
    Message,
    NodeId,
    SnapshotRequest,
)

OnMessages = Callable[[list[Message]], None]
"""Called on the event loop with every batch that arrived for this node, in arrival order.

It must not block: the runner is expected to enqueue the batch for its next loop turn.
"""

# Per-peer defaults. A leader produces at most a few messages per peer per tick, so 1024
# queued messages is far more than a healthy peer ever needs; the byte cap protects
# against a queue full of large AppendRequests/snapshots for a peer that stopped reading.
DEFAULT_MAX_QUEUE_MESSAGES = 1024
DEFAULT_MAX_QUEUE_BYTES = 64 * 1024 * 1024


class Transport(Protocol):
    """Delivers Raft messages between nodes addressed by node id.

    Implementations are constructed as ``(node_id, peers, on_messages, **options)``:
    this node's id, a mapping node id -> base URL of every peer (an entry for this node
    is ignored) and the `OnMessages` callback.
    """

    def send(self, messages: Sequence[Message]) -> None:
        """Queue messages for their `dst` peers and return at once.

        Never blocks and never raises for a peer that is down, slow or unknown: such
        messages are dropped (Raft re-sends). Per destination the order is preserved.
        """
        ...

    def set_peers(self, peers: Mapping[NodeId, str]) -> None:
        """Replace the peer address book (membership change or a peer that moved).

        Messages already queued for a removed peer are dropped.
        """
        ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop sending and receiving; queued messages are dropped. Safe to call twice."""
        ...


@dataclass(slots=True)
class TransportStats:
    """Counters for metrics and tests. Every message handed to send() ends up in exactly
    one of `sent` or `dropped` (or is still queued)."""

    sent: int = 0  # messages the peer acknowledged receiving
    dropped: int = 0  # messages discarded on the sending side, for any reason
    received: int = 0  # messages delivered to this node's on_messages
    rejected: int = 0  # incoming batches refused (bad secret, malformed, wrong dst)
    failed_requests: int = 0  # outgoing batches that did not get through


def approx_size(message: Message) -> int:
    """A cheap upper-bound-ish estimate of a message's encoded size, for queue byte caps.

    Encoding on every send() just to account bytes would double the encoding work; only
    payload-carrying messages can be large, so counting their payloads is enough.
    """
    size = 64 + len(message.src) + len(message.dst)
    if isinstance(message, AppendRequest):
        size += sum(16 + len(e.data) for e in message.entries)
    elif isinstance(message, SnapshotRequest):
        snap = message.snapshot
        size += len(snap.data) + sum(8 + len(v) for v in snap.meta.voters)
    return size


class BoundedMessageQueue:
    """FIFO of messages for one peer, bounded by count and by approximate bytes.

    When full it drops the OLDEST messages. Raft messages are superseded by later ones:
    a newer AppendRequest/heartbeat carries a newer commit index and term, and a vote for
    an older term is useless. Dropping the newest instead would keep stale traffic and
    throw away exactly what lets a recovering peer catch up fastest.
    """

    __slots__ = ("_bytes", "_items", "max_bytes", "max_messages")

    def __init__(
        self,
        max_messages: int = DEFAULT_MAX_QUEUE_MESSAGES,
        max_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("queue bounds must be positive")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: deque[tuple[Message, int]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, message: Message) -> int:
        """Append a message; return how many older messages were dropped to make room.

        A message larger than the byte cap on its own is still kept (alone), so an
        oversized snapshot is dropped by the sender with a clear log, not silently here.
        """
        size = approx_size(message)
        self._items.append((message, size))
        self._bytes += size
        dropped = 0
        # Bounded: each iteration removes one item and the last one is never removed.
        while len(self._items) > 1 and (
            len(self._items) > self.max_messages or self._bytes > self.max_bytes
        ):
            _, old_size = self._items.popleft()
            self._bytes -= old_size
            dropped += 1
        return dropped

    def extend(self, messages: Iterable[Message]) -> int:
        return sum(self.push(m) for m in messages)

    def take_all(self) -> list[Message]:
        items = [m for m, _ in self._items]
        self._items.clear()
        self._bytes = 0
        return items
