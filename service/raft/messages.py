"""Values that flow in and out of the Raft core.

Everything here is a frozen dataclass so the core can hand the same object to the
runner, the simulator and the codec without anyone mutating it behind its back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

NodeId = str


class EntryKind(IntEnum):
    """What a log entry carries; the core interprets NOOP and CONFIG, never NORMAL."""

    NORMAL = 0
    NOOP = 1  # appended by a new leader so it can commit entries of earlier terms
    CONFIG = 2  # data is an encoded ClusterConfig (single-server membership change)


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """Term and vote are one value so storage writes them together, never one alone."""

    term: int = 0
    vote: NodeId | None = None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    voters: tuple[NodeId, ...]

    def encode(self) -> bytes:
        return ",".join(self.voters).encode()

    @staticmethod
    def decode(data: bytes) -> ClusterConfig:
        text = data.decode()
        return ClusterConfig(tuple(v for v in text.split(",") if v))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    voters: tuple[NodeId, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes


# --- messages between peers -------------------------------------------------


@dataclass(frozen=True, slots=True)
class VoteRequest:
    term: int
    src: NodeId
    dst: NodeId
    last_log_index: int
    last_log_term: int
    prevote: bool = False
    # Set by a candidate started through TimeoutNow: voters skip the leader-lease check.
    transfer: bool = False


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: int
    src: NodeId
    dst: NodeId
    granted: bool
    prevote: bool = False


@dataclass(frozen=True, slots=True)
class AppendRequest:
    term: int
    src: NodeId
    dst: NodeId
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int
    # Heartbeat round the leader uses to confirm leadership for ReadIndex (0: none).
    read_ctx: int = 0


@dataclass(frozen=True, slots=True)
class AppendResponse:
    term: int
    src: NodeId
    dst: NodeId
    success: bool
    # On success: the highest index known to match the leader's log.
    # On rejection: a hint where the leader should retry (follower's last index + 1 or
    # the first index of the conflicting term).
    match_index: int
    read_ctx: int = 0
    # The follower lost its storage and is rejoining (core.py): what it acknowledged
    # before is gone, so the leader must stop counting on it and start over.
    log_lost: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    term: int
    src: NodeId
    dst: NodeId
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class SnapshotResponse:
    term: int
    src: NodeId
    dst: NodeId
    match_index: int


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the receiver starts an election at once."""

    term: int
    src: NodeId
    dst: NodeId


Message = (
    VoteRequest
    | VoteResponse
    | AppendRequest
    | AppendResponse
    | SnapshotRequest
    | SnapshotResponse
    | TimeoutNow
)


# --- core output ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex request is safe to serve once the state machine applied `index`."""

    ctx: int
    index: int


@dataclass(slots=True)
class Ready:
    """Everything the runner must do, in order: persist, send, apply, then advance().

    Two exceptions to the order: a leader's AppendRequests (`Ready.early_messages`) may
    leave before the persist, so followers write the entries while the leader does
    (thesis 10.2.1); the core counts the leader's own copy only once advance() says it
    is persisted. And committed entries below `entries[0]` (already in the durable log)
    may be applied before the persist, which does not touch them.

    `entries` replace the persisted log from `entries[0].index` on (a follower's conflicting
    suffix is truncated by the same write). `snapshot`, when set, replaces the whole log
    up to its index and must be persisted before the entries.
    """

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    messages: list[Message] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    must_sync: bool = False

    def early_messages(self, leading: bool) -> tuple[list[Message], list[Message]]:
        """(messages that may be sent before this Ready is persisted, the rest).

        Only a leader's AppendRequests: their entries and commit index stand on their
        own, and the leader's term is already durable (persisted when it campaigned).
        Everything else (votes, a follower's acknowledgements) speaks for what this node
        has on disk, so it waits for the persist.
        """
        if not leading or not (self.entries or self.hard_state):
            return [], self.messages
        early: list[Message] = [m for m in self.messages if isinstance(m, AppendRequest)]
        if not early:
            return [], self.messages
        return early, [m for m in self.messages if not isinstance(m, AppendRequest)]

    def is_empty(self) -> bool:
        return not (
            self.hard_state
            or self.entries
            or self.snapshot
            or self.messages
            or self.committed
            or self.read_states
        )
