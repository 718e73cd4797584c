"""Every Redis key dsync writes, in one place.

All keys live under ``dsync:`` so a node can share a Redis with nothing else by accident
and an operator can list them with ``redis-cli --scan --pattern 'dsync:*'``.

=============================  ======  ===================================================
Key                            Type    Contents
=============================  ======  ===================================================
dsync:schema:version           string  Schema version of this layout (decimal), advanced
                                       by ``migrations/`` at node start.
dsync:migrations               hash    ``<version>_<name>`` -> UTC time it was applied.
dsync:raft:hardstate           hash    ``term`` (decimal); ``vote`` (node id, absent when
                                       the node has not voted in this term).
dsync:raft:log                 zset    One member per log entry after the snapshot, score
                                       = index. Member = ``<index>:<term>:<kind>:<data>``,
                                       e.g. ``42:7:normal:<command bytes>``.
dsync:raft:snapshot            hash    ``index``, ``term``, ``voters`` (comma separated),
                                       ``data`` (opaque state machine dump).
dsync:raft:rejoining           string  Present while this node, back with lost storage,
                                       has not caught up (service/raft/rejoin.py).
dsync:state:applied_index      string  Highest log index whose effects are in the state
                                       hashes below (decimal, written in the same MULTI).
dsync:<service>:...            hash    Applied state of each state machine under its own
                                       prefix (e.g. ``dsync:lock:``), one hash per object.
=============================  ======  ===================================================

Why a sorted set for the log: Raft only ever drops a suffix (a follower's conflicting
entries) or a prefix (compaction), and ``ZREMRANGEBYSCORE`` does either inside a
MULTI without first reading the old bounds, so every log write is one atomic round trip
even on servers without Lua. Range reads are ``ZRANGEBYSCORE``. Scores are doubles, exact
for indexes below 2**53.

Why a text header instead of msgpack: the entry's ``data`` is already the runner's
compact command encoding, so wrapping it again saves nothing, while the readable
``index:term:kind:`` header lets an operator see terms with
``redis-cli ZRANGEBYSCORE dsync:raft:log 40 50``. The index in the member also keeps two
identical commands at different indexes distinct members.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

NAMESPACE: Final = "dsync:"

SCHEMA_VERSION: Final = "dsync:schema:version"
MIGRATIONS: Final = "dsync:migrations"

HARD_STATE: Final = "dsync:raft:hardstate"
LOG: Final = "dsync:raft:log"
SNAPSHOT: Final = "dsync:raft:snapshot"

APPLIED_INDEX: Final = "dsync:state:applied_index"

# State machines must keep out of these: a replace_all("dsync:") would otherwise wipe
# the Raft hard state and snapshot, which are hashes too.
RESERVED_PREFIXES: Final = ("dsync:schema:", "dsync:migrations", "dsync:raft:", "dsync:state:")


def check_state_prefix(prefix: str) -> None:
    """Refuse a state-machine prefix that would reach outside its own keys."""
    if not prefix.startswith(NAMESPACE) or len(prefix) == len(NAMESPACE):
        raise ValueError(f"state prefix {prefix!r} must be {NAMESPACE!r} plus a service name")
    for reserved in RESERVED_PREFIXES:
        if prefix.startswith(reserved) or reserved.startswith(prefix):
            raise ValueError(f"state prefix {prefix!r} overlaps reserved keys {reserved!r}")


def check_state_key(key: str) -> None:
    """Refuse a state-machine hash key outside the namespace or inside reserved keys."""
    if not key.startswith(NAMESPACE):
        raise ValueError(f"state key {key!r} must start with {NAMESPACE!r}")
    for reserved in RESERVED_PREFIXES:
        if key.startswith(reserved):
            raise ValueError(f"state key {key!r} is inside reserved keys {reserved!r}")


def check_replacement(prefixes: Sequence[str], hashes: Iterable[str]) -> None:
    """Refuse a replace_all whose hashes are not all under the prefixes it replaces."""
    for prefix in prefixes:
        check_state_prefix(prefix)
    for key in hashes:
        check_state_key(key)
        if not key.startswith(tuple(prefixes)):
            raise ValueError(f"state key {key!r} is not under the replaced prefixes {prefixes!r}")


def scan_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for keys starting with prefix, glob characters escaped."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
    return escaped + "*"
