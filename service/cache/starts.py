"""Which nodes' caches have ever started: the one fact about the cache in the Raft log.

A node whose cache store is empty is either starting for the first time or has lost its
disk; only the second must take its data back from the peers' mirrors (mirrored.py), and
only the second must wait for every peer to do it. The node's own disk cannot tell
them apart (it is the thing that was lost), so each node records its first start here,
and the answer to that command says whether it had been recorded before.

Redis layout: `dsync:cachestart:<node>` hash, `index` = the log index of the first start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.statemachine import Command
from service.storage.protocols import HashWrite

PREFIX = "dsync:cachestart:"
STARTED = "cache.started"


class CacheStartsMachine:
    prefix = PREFIX

    def __init__(self) -> None:
        self._started: dict[str, int] = {}  # node -> log index of its first cache start
        self._dirty: list[str] = []

    def handles(self, op: str) -> bool:
        return op == STARTED

    def started(self, node: str) -> bool:
        return node in self._started

    def apply(self, index: int, command: Command) -> Any:
        node = command.args.get("node")
        if not isinstance(node, str) or not node:
            return {"status": "error", "code": "bad_request", "message": "node required"}
        if node in self._started:
            return {"status": "ok", "before": True, "index": self._started[node]}
        self._started[node] = index
        self._dirty.append(node)
        return {"status": "ok", "before": False, "index": index}

    def take_writes(self) -> list[HashWrite]:
        writes = [HashWrite(PREFIX + n, {"index": str(self._started[n])}) for n in self._dirty]
        self._dirty.clear()
        return writes

    def dump(self) -> dict[str, dict[str, str]]:
        return {PREFIX + n: {"index": str(i)} for n, i in self._started.items()}

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        self._started = {
            key[len(PREFIX) :]: int(fields["index"])
            for key, fields in hashes.items()
            if key.startswith(PREFIX) and "index" in fields
        }
        self._dirty.clear()


__all__ = ["STARTED", "CacheStartsMachine"]
