"""LockService's side of blocking waits that needs no Raft: how a wait that starts
learns where it stands (service/locks/service.py, `_settled_from_table`)."""

from __future__ import annotations

from typing import Any

import pytest

from service.locks.service import LockService
from service.locks.table import LockTable
from service.metrics import NodeMetrics
from service.statemachine import Command


def apply(svc: LockService, index: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
    result = svc.machine.apply(index, Command(op, args, None, 1_000))
    assert isinstance(result, dict)
    return result


def acquire(svc: LockService, index: int, owner: str, wait: bool = False) -> dict[str, Any]:
    args: dict[str, Any] = {"name": "hot", "owner": owner, "mode": "exclusive", "ttl_ms": 5_000}
    if wait:
        args |= {"wait": True, "wait_ms": 60_000}
    return apply(svc, index, "lock.acquire", args)


def test_a_starting_wait_learns_its_standing_without_walking_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each blocking acquire asks the table where it stands as it starts to wait. That
    # built the lock's whole view, so a burst of 5,000 waiters on one lock cost the
    # leader 12.5 million waiter copies in a few loop turns: it stalled over 0.5 s, its
    # followers took it for dead and elected another (scale_bench.py hot-lock --waiters
    # 5000, 4 runs of 5).
    svc = LockService("n1", NodeMetrics("n1"))
    holder = acquire(svc, 1, "holder")
    seqs = [acquire(svc, 2 + i, f"w{i}", wait=True)["seq"] for i in range(3_000)]

    def whole_view(*_: object) -> None:
        raise AssertionError("built the lock's view")

    monkeypatch.setattr(LockTable, "get", whole_view)
    for i, seq in enumerate(seqs):
        assert svc._settled_from_table("hot", f"w{i}", seq) is None  # still waiting
    assert svc._settled_from_table("hot", "w0", seqs[0] + 1) == {
        "status": "wait_timeout",
        "name": "hot",
    }  # a wait of w0 that is gone
    apply(svc, 5_000, "lock.release", {"name": "hot", "owner": "holder", "token": holder["token"]})
    granted = svc._settled_from_table("hot", "w0", seqs[0])
    assert granted is not None and granted["status"] == "granted"
    assert granted["token"] == 5_000 and granted["owner"] == "w0"
