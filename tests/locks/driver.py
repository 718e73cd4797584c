"""Test helpers: feed commands to a lock machine the way the runner would."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.locks import LockStateMachine
from service.statemachine import Command
from service.storage.protocols import HashWrite


class Driver:
    """Applies commands with strictly increasing log indexes and a settable clock."""

    def __init__(self, machine: LockStateMachine | None = None, index: int = 0) -> None:
        self.m = machine if machine is not None else LockStateMachine()
        self.index = index
        self.now = 0

    def apply(
        self, op: str, args: Any = None, request_id: str | None = None, now: int | None = None
    ) -> Any:
        self.index += 1
        command = Command(
            op, {} if args is None else args, request_id, self.now if now is None else now
        )
        return self.m.apply(self.index, command)

    def acquire(
        self,
        name: str,
        owner: str,
        mode: str = "exclusive",
        ttl: int = 1000,
        wait: bool = False,
        wait_ms: int | None = None,
    ) -> dict[str, Any]:
        args: dict[str, Any] = {
            "name": name,
            "owner": owner,
            "mode": mode,
            "ttl_ms": ttl,
            "wait": wait,
        }
        if wait_ms is not None:
            args["wait_ms"] = wait_ms
        result: dict[str, Any] = self.apply("lock.acquire", args)
        return result

    def release(self, name: str, owner: str, token: int) -> dict[str, Any]:
        result: dict[str, Any] = self.apply(
            "lock.release", {"name": name, "owner": owner, "token": token}
        )
        return result

    def keepalive(
        self, name: str, owner: str, token: int, ttl: int | None = None
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"name": name, "owner": owner, "token": token}
        if ttl is not None:
            args["ttl_ms"] = ttl
        result: dict[str, Any] = self.apply("lock.keepalive", args)
        return result

    def expire(self, name: str, owner: str, token: int) -> dict[str, Any]:
        result: dict[str, Any] = self.apply(
            "lock.expire", {"name": name, "owner": owner, "token": token}
        )
        return result

    def cancel(self, name: str, owner: str, seq: int | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"name": name, "owner": owner}
        if seq is not None:
            args["seq"] = seq
        result: dict[str, Any] = self.apply("lock.cancel_wait", args)
        return result

    def expire_wait(self, name: str, owner: str, seq: int) -> dict[str, Any]:
        result: dict[str, Any] = self.apply(
            "lock.expire_wait", {"name": name, "owner": owner, "seq": seq}
        )
        return result

    def leader_change(self, now: int) -> dict[str, Any]:
        self.now = now
        result: dict[str, Any] = self.apply("lock.leader_change")
        return result

    def holders(self, name: str) -> list[tuple[str, str, int]]:
        view = self.m.get(name)
        return [] if view is None else [(h.owner, h.mode.value, h.token) for h in view.holders]

    def waiters(self, name: str) -> list[tuple[str, str]]:
        view = self.m.get(name)
        return [] if view is None else [(w.owner, w.mode.value) for w in view.waiters]


def apply_writes(store: dict[str, dict[str, str]], writes: list[HashWrite]) -> None:
    """What the Redis StateStore does with HashWrites, on a dict."""
    for w in writes:
        if w.drop:
            store.pop(w.key, None)
        fields = store.setdefault(w.key, {})
        for f in w.deleted:
            fields.pop(f, None)
        fields.update(w.fields)
        if not fields:
            del store[w.key]


def copy_hashes(hashes: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    return {k: dict(v) for k, v in hashes.items()}
