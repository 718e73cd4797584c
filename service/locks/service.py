"""The lock service: the async side of the lock manager, around the pure LockStateMachine.

What it adds to the state machine, and why each piece lives here:
- The leader's clock. Every lock command carries the proposing leader's monotonic time
  (`now_ms`); no replica reads a clock while applying.
- Arming a new leader. Deadlines written under an old leader are points on another
  machine's clock, so a new leader first commits `lock.leader_change` (every lease and
  wait gets a full budget on its clock) and only then starts expiring anything.
- Expiry. While armed, the leader scans for leases and waits past their deadline and
  proposes `lock.expire` / `lock.expire_wait`: expiry is a committed decision, never a
  replica's guess.
- Blocking waits. An acquire that queued is answered when the grant is applied (every
  replica emits the same grant events; the node holding the HTTP request answers). A
  wait that times out is cancelled through the log before the client hears
  `wait_timeout`, so a client that gave up is never granted the lock afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.clock import now_ms
from service.locks import results
from service.locks.machine import LockStateMachine
from service.locks.table import Granted, LockView, WaitDropped
from service.metrics import NodeMetrics
from service.raft.core import RaftError, Role
from service.raft.runner import RaftRunner
from service.statemachine import Command, StateMachine

log = logging.getLogger("dsync.locks")

Result = dict[str, Any]
# Proposes a command on whichever node leads (here, or forwarded) and returns its result.
RemoteCancel = Callable[[str, str, int], Awaitable[Result]]

PROPOSE_TIMEOUT_SECONDS = 5.0
# How often an armed leader looks for expired leases and waits.
EXPIRY_SCAN_SECONDS = 0.05
HELD_GAUGE_SECONDS = 1.0
# At most this many expiry proposals in flight: a mass expiry must not starve clients.
MAX_EXPIRIES_IN_FLIGHT = 256
# The cancel of a timed-out wait is retried this long before the outcome is "unknown".
CANCEL_DEADLINE_SECONDS = 5.0


class LockUnavailable(RaftError):
    """The outcome of a lock operation could not be established (e.g. a cancel that never
    reached a leader); the caller must treat it as unknown."""


@dataclass(slots=True)
class _Wait:
    name: str
    owner: str
    seq: int
    future: asyncio.Future[Granted | WaitDropped]


class LockService:
    def __init__(self, node_id: str, metrics: NodeMetrics) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.machine = LockStateMachine()
        self.runner: RaftRunner | None = None
        # Set by the node: how to cancel a wait when this node is not the leader.
        self.remote_cancel: RemoteCancel | None = None
        self._waits: dict[tuple[str, str], list[_Wait]] = {}
        self._armed_term = 0
        self._arming_term = 0
        self._in_flight: set[tuple[str, str, str, int]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scanner: asyncio.Task[None] | None = None
        self._stopping = False
        # Create every series at 0 so dashboards and alerts see them before the first event.
        for series in (
            metrics.lock_releases,
            metrics.lock_expiries,
            metrics.lock_deadlocks,
            metrics.lock_held,
            metrics.lock_acquire_seconds,
        ):
            series.labels(node_id)
        for mode in ("exclusive", "shared"):
            metrics.lock_acquisitions.labels(node_id, mode)
        for outcome in ("queued", "granted", "timeout"):
            metrics.lock_waits.labels(node_id, outcome)

    # --- service wiring --------------------------------------------------------------

    def state_machines(self) -> list[StateMachine]:
        return [self.machine]

    def attach(self, runner: RaftRunner) -> None:
        self.runner = runner
        runner.add_apply_listener(self._on_apply)
        runner.add_role_listener(self._on_role)
        self._on_role(runner.core.role, runner.core.term, runner.core.leader)
        self._scanner = asyncio.create_task(self._scan_loop(), name=f"lock-expiry-{self.node_id}")

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self._tasks, *([self._scanner] if self._scanner is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for waits in self._waits.values():
            for wait in waits:
                if not wait.future.done():
                    wait.future.cancel()
        self._waits.clear()

    # --- state -----------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        """True on a leader whose `lock.leader_change` of this term has been applied."""
        runner = self.runner
        return (
            runner is not None
            and runner.core.role == Role.LEADER
            and runner.core.term == self._armed_term
        )

    def expires_in_ms(self, expires_at_ms: int, ttl_ms: int) -> int:
        """Time left on a lease, as the API reports it. Only an armed leader's clock is
        comparable with stored deadlines; elsewhere the full TTL is the honest bound."""
        if not self.armed:
            return ttl_ms
        return max(0, min(ttl_ms, expires_at_ms - now_ms()))

    def get(self, name: str) -> LockView | None:
        return self.machine.get(name)

    def all_held(self) -> list[LockView]:
        return self.machine.all_held()

    def held_page(self, after: str | None, limit: int) -> tuple[list[LockView], bool]:
        """Held locks named after `after`, in name order: `limit` at most, and whether
        more follow."""
        return self.machine.held_page(after, limit)

    def hold_of(self, name: str, owner: str) -> Granted | None:
        return self.machine.hold_of(name, owner)

    def validate(self, name: str, token: int) -> bool:
        return self.machine.validate(name, token)

    # --- commands ----------------------------------------------------------------------

    async def propose(self, op: str, args: dict[str, Any], request_id: str | None) -> Result:
        runner = self._runner()
        result = await runner.propose(
            Command(op, args, request_id, now_ms()), PROPOSE_TIMEOUT_SECONDS
        )
        if not isinstance(result, dict):
            raise LockUnavailable(f"unexpected result for {op}: {result!r}")
        return result

    async def acquire(
        self,
        name: str,
        owner: str,
        mode: str,
        ttl_ms: int,
        wait_ms: int,
        request_id: str | None,
    ) -> Result:
        """Acquire (waiting up to wait_ms); returns the machine's result dict, with status
        granted / held / deadlock / error, or wait_timeout when the wait ran out."""
        started = time.perf_counter()
        args: dict[str, Any] = {"name": name, "owner": owner, "mode": mode, "ttl_ms": ttl_ms}
        if wait_ms > 0:
            args["wait"] = True
            args["wait_ms"] = wait_ms
        result = await self.propose("lock.acquire", args, request_id)
        if result.get("status") == "queued":
            self.metrics.lock_waits.labels(self.node_id, "queued").inc()
            result = await self._wait_for_grant(name, owner, int(result["seq"]), wait_ms)
        self._count_acquire(result, time.perf_counter() - started)
        return result

    async def release(self, name: str, owner: str, token: int, request_id: str | None) -> Result:
        result = await self.propose(
            "lock.release", {"name": name, "owner": owner, "token": token}, request_id
        )
        if result.get("status") == "released":
            self.metrics.lock_releases.labels(self.node_id).inc()
        return result

    async def keepalive(
        self, name: str, owner: str, token: int, ttl_ms: int | None, request_id: str | None
    ) -> Result:
        args: dict[str, Any] = {"name": name, "owner": owner, "token": token}
        if ttl_ms is not None:
            args["ttl_ms"] = ttl_ms
        return await self.propose("lock.keepalive", args, request_id)

    async def cancel_wait(self, name: str, owner: str, seq: int | None) -> Result:
        args: dict[str, Any] = {"name": name, "owner": owner}
        if seq is not None:
            args["seq"] = seq
        return await self.propose("lock.cancel_wait", args, None)

    # --- blocking waits ----------------------------------------------------------------

    async def _wait_for_grant(self, name: str, owner: str, seq: int, wait_ms: int) -> Result:
        loop = asyncio.get_running_loop()
        wait = _Wait(name, owner, seq, loop.create_future())
        key = (name, owner)
        self._waits.setdefault(key, []).append(wait)
        try:
            # The grant may already be applied (a retried request whose first copy
            # queued long ago): the table is the truth, the events only wake us.
            settled = self._settled_from_table(name, owner, seq)
            if settled is not None:
                return settled
            try:
                outcome = await asyncio.wait_for(asyncio.shield(wait.future), wait_ms / 1000)
            except TimeoutError:
                return await self._give_up(name, owner, seq)
        finally:
            waits = self._waits.get(key)
            if waits is not None:
                with contextlib.suppress(ValueError):
                    waits.remove(wait)
                if not waits:
                    del self._waits[key]
        if isinstance(outcome, Granted):
            self.metrics.lock_waits.labels(self.node_id, "granted").inc()
            return results.granted(outcome)
        self.metrics.lock_waits.labels(self.node_id, "timeout").inc()
        return {"status": "wait_timeout", "name": name}

    def _settled_from_table(self, name: str, owner: str, seq: int) -> Result | None:
        granted = self.machine.hold_of(name, owner)
        if granted is not None:
            return results.granted(granted)
        if self.machine.is_waiting(name, owner, seq):
            return None
        return {"status": "wait_timeout", "name": name}

    async def _give_up(self, name: str, owner: str, seq: int) -> Result:
        """The wait ran out: remove it through the log (or learn it was granted first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_DEADLINE_SECONDS
        last_error: BaseException | None = None
        while loop.time() < deadline and not self._stopping:
            try:
                if self.armed or self.remote_cancel is None:
                    result = await self.cancel_wait(name, owner, seq)
                else:
                    result = await self.remote_cancel(name, owner, seq)
            except (RaftError, TimeoutError, OSError) as exc:
                last_error = exc
                await asyncio.sleep(0.05)
                continue
            status = result.get("status")
            if status == "granted":
                # Granted before the cancel applied: the client is still here, so it
                # gets the lock rather than a lock it does not know it holds.
                self.metrics.lock_waits.labels(self.node_id, "granted").inc()
                return result
            if status in ("cancelled", "not_waiting"):
                self.metrics.lock_waits.labels(self.node_id, "timeout").inc()
                return {"status": "wait_timeout", "name": name}
            last_error = LockUnavailable(f"cancel returned {result!r}")
            await asyncio.sleep(0.05)
        raise LockUnavailable(
            f"could not cancel the wait for {name!r} ({last_error}); the lock may still be "
            "granted to this owner: release it with the token from GET /v1/locks/{name}"
        )

    def _on_apply(self, index: int, command: Command, result: Any) -> None:
        if not command.op.startswith("lock."):
            return
        for event in self.machine.take_events():
            waits = self._waits.get((event.name, event.owner))
            if not waits:
                continue
            for wait in waits:
                if wait.future.done():
                    continue
                if isinstance(event, Granted) or event.seq == wait.seq:
                    wait.future.set_result(event)

    # --- leadership and expiry ---------------------------------------------------------

    def _on_role(self, role: Role, term: int, leader: str | None) -> None:
        if role == Role.LEADER and term > self._arming_term and not self._stopping:
            self._arming_term = term
            self._spawn(self._arm(term))

    async def _arm(self, term: int) -> None:
        """Commit lock.leader_change for this term, retrying while we still lead in it."""
        runner = self._runner()
        while runner.core.role == Role.LEADER and runner.core.term == term:
            try:
                await self.propose("lock.leader_change", {}, None)
            except (RaftError, TimeoutError) as exc:
                log.info("arming lock leases failed, retrying", extra={"error": str(exc)})
                await asyncio.sleep(0.05)
                continue
            if runner.core.role == Role.LEADER and runner.core.term == term:
                self._armed_term = term
                log.info("lock leases armed", extra={"term": term})
            return

    async def _scan_loop(self) -> None:
        loop = asyncio.get_running_loop()
        gauge_due = 0.0
        while not self._stopping:
            await asyncio.sleep(EXPIRY_SCAN_SECONDS)
            if loop.time() >= gauge_due:
                # Counting walks every lock (free ones included): once a second is plenty.
                gauge_due = loop.time() + HELD_GAUGE_SECONDS
                self.metrics.lock_held.labels(self.node_id).set(self.machine.held_count())
            if self.armed:
                self._propose_expiries(now_ms())

    def _propose_expiries(self, now: int) -> None:
        # The earliest MAX_EXPIRIES_IN_FLIGHT of each kind are enough: those in flight
        # are among them (they stay due until applied), and the budget is what is left.
        budget = MAX_EXPIRIES_IN_FLIGHT - len(self._in_flight)
        for due in self.machine.expired(now, MAX_EXPIRIES_IN_FLIGHT):
            key = ("hold", due.name, due.owner, due.ident)
            if budget > 0 and key not in self._in_flight:
                args = {"name": due.name, "owner": due.owner, "token": due.ident}
                self._spawn(self._expire("lock.expire", args, key))
                budget -= 1
        for due in self.machine.expired_waits(now, MAX_EXPIRIES_IN_FLIGHT):
            key = ("wait", due.name, due.owner, due.ident)
            if budget > 0 and key not in self._in_flight:
                args = {"name": due.name, "owner": due.owner, "seq": due.ident}
                self._spawn(self._expire("lock.expire_wait", args, key))
                budget -= 1

    async def _expire(self, op: str, args: dict[str, Any], key: tuple[str, str, str, int]) -> None:
        self._in_flight.add(key)
        try:
            result = await self.propose(op, args, None)
            if op == "lock.expire" and result.get("status") == "expired":
                self.metrics.lock_expiries.labels(self.node_id).inc()
                log.info("lease expired", extra={"lock": args["name"], "owner": args["owner"]})
        except (RaftError, TimeoutError) as exc:
            log.debug("expiry proposal failed", extra={"op": op, "error": str(exc)})
        finally:
            self._in_flight.discard(key)

    # --- helpers -----------------------------------------------------------------------

    def _runner(self) -> RaftRunner:
        if self.runner is None:
            raise LockUnavailable("the lock service is not attached to a running node")
        return self.runner

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_acquire(self, result: Result, seconds: float) -> None:
        status = result.get("status")
        if status == "granted":
            self.metrics.lock_acquisitions.labels(self.node_id, str(result.get("mode"))).inc()
            self.metrics.lock_acquire_seconds.labels(self.node_id).observe(seconds)
        elif status == "deadlock":
            self.metrics.lock_deadlocks.labels(self.node_id).inc()

