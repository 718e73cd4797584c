"""The contract between the Raft runner and the services' deterministic state machines.

A state machine never does I/O and never reads a clock: everything it needs (including
the leader's time, for leases) arrives inside the command. After applying a batch of
entries the runner collects `take_writes()` and writes them to Redis together with the
applied index in one transaction, so the applied state is materialised and a restart
loads it (`load`) instead of replaying history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.storage.protocols import HashWrite


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded NORMAL log entry.

    `op` names the operation ("lock.acquire", "kv.put", ...), `args` its arguments,
    `request_id` (optional) makes a retried command apply once, `now_ms` is the proposing
    leader's monotonic clock in ms (state machines use it instead of reading a clock).
    """

    op: str
    args: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    now_ms: int = 0


class StateMachine(Protocol):
    # Every Redis key this machine materialises starts with this prefix.
    prefix: str

    def handles(self, op: str) -> bool: ...

    def apply(self, index: int, command: Command) -> Any:
        """Apply one committed command; return a msgpack-able result for the proposer."""
        ...

    def take_writes(self) -> list[HashWrite]:
        """Hash changes since the last call (the runner writes them with the applied index)."""
        ...

    def dump(self) -> dict[str, dict[str, str]]:
        """The whole state as the hashes `load` accepts (used for snapshots)."""
        ...

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        """Replace the whole state from materialised hashes (at start or from a snapshot)."""
        ...
