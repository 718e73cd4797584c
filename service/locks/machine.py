"""LockStateMachine: the lock table behind the runner's StateMachine protocol.

Commands (`Command.op`, `Command.args`; every command also uses `Command.now_ms`):

    lock.acquire       {name, owner, mode?="exclusive", ttl_ms, wait?=false, wait_ms?}
    lock.release       {name, owner, token}
    lock.keepalive     {name, owner, token, ttl_ms?}          (ttl_ms absent: keep the ttl)
    lock.expire        {name, owner, token}                    (leader: lease ran out)
    lock.cancel_wait   {name, owner, seq?}                     (waiter gave up)
    lock.expire_wait   {name, owner, seq}                      (leader: wait deadline passed)
    lock.leader_change {now_ms?}                               (new leader: reset all leases)

Results are plain dicts (msgpack- and JSON-safe); see `results.py` for each shape. Side
effects the proposer does not see (waiters granted or dropped because of someone else's
command) are queued as events, drained with `take_events()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from service.locks import results
from service.locks.codec import decode, decode_epoch, encode, encode_changes, encode_epoch
from service.locks.commands import (
    BadCommand,
    parse_acquire,
    parse_hold_ref,
    parse_keepalive,
    parse_now,
    parse_wait_ref,
)
from service.locks.table import (
    DEFAULT_MAX_TOMBSTONES,
    Due,
    Granted,
    LockEvent,
    LockTable,
    LockView,
)
from service.snapshot_entries import pack_entry
from service.statemachine import Command
from service.storage.protocols import HashWrite

log = logging.getLogger(__name__)

PREFIX = "dsync:lock:"
# The lease epoch (LockTable.leader_change): the empty name, which no lock can have.
EPOCH_KEY = PREFIX

Result = dict[str, Any]
_Handler = Callable[[int, Command, Mapping[str, Any]], Result]


class LockStateMachine:
    prefix: str = PREFIX

    def __init__(self, max_tombstones: int = DEFAULT_MAX_TOMBSTONES) -> None:
        # Every replica must use the same bound, or their materialised state diverges
        # (harmlessly for fencing, but snapshots would differ).
        self._table = LockTable(max_tombstones)
        # name -> its snapshot entry, packed, for locks unchanged since (packed_dump)
        self._packed: dict[str, bytes] = {}
        self._handlers: dict[str, _Handler] = {
            "lock.acquire": self._acquire,
            "lock.release": self._release,
            "lock.keepalive": self._keepalive,
            "lock.expire": self._expire,
            "lock.cancel_wait": self._cancel_wait,
            "lock.expire_wait": self._expire_wait,
            "lock.leader_change": self._leader_change,
        }

    # --- StateMachine protocol -------------------------------------------------------

    def handles(self, op: str) -> bool:
        # Claim the whole namespace so a misspelt lock op gets a clear error result
        # instead of "no machine handles it".
        return op.startswith("lock.")

    def apply(self, index: int, command: Command) -> Result:
        handler = self._handlers.get(command.op)
        if handler is None:
            return results.error("unknown_op", f"unknown lock operation {command.op!r}")
        args = command.args
        if not isinstance(args, Mapping):
            return results.error("bad_command", "arguments must be an object")
        if not isinstance(command.now_ms, int) or isinstance(command.now_ms, bool):
            return results.error("bad_command", "now_ms must be an integer")
        try:
            return handler(index, command, args)
        except BadCommand as exc:
            return results.error("bad_command", str(exc))
        except Exception:
            # Last line of defence: a bug here would otherwise stop every replica at
            # this same log entry, forever. All replicas run the same code, so they all
            # take this branch and stay identical.
            log.exception("lock command %s at index %d failed", command.op, index)
            return results.error("internal", "the lock service failed to apply this command")

    def take_writes(self) -> list[HashWrite]:
        writes: list[HashWrite] = []
        if self._table.take_epoch_change():
            writes.append(HashWrite(EPOCH_KEY, self._epoch_fields(), drop=True))
        for name, changes in self._table.take_changes():
            self._packed.pop(name, None)
            state = self._table.state(name)
            if state is None or changes is None:  # forgotten
                fields = encode(state) if state is not None else {}
                writes.append(HashWrite(PREFIX + name, fields, drop=True))
                continue
            # Field by field: a lock with thousands of waiters is one grant or release
            # away from its last write, and rewriting it whole made each such step cost
            # the whole queue (a third of the leader's CPU with 5,000 waiters).
            fields, deleted = encode_changes(state, changes)
            writes.append(HashWrite(PREFIX + name, fields, tuple(deleted)))
        return writes

    def dump(self) -> dict[str, dict[str, str]]:
        dumped: dict[str, dict[str, str]] = {}
        if self._table.lease_epoch() != (0, 0):
            dumped[EPOCH_KEY] = self._epoch_fields()
        for name in self._table.names():
            state = self._table.state(name)
            if state is not None:
                dumped[PREFIX + name] = encode(state)
        return dumped

    def packed_dump(self) -> list[bytes]:
        """`dump()` as packed snapshot entries. A lock's entry is packed once and kept
        until the lock changes (its change reaches take_writes, which drops it), so a
        snapshot of many idle locks re-encodes only the ones that moved."""
        unflushed = self._table.unflushed()
        packed = self._packed
        entries: list[bytes] = []
        if self._table.lease_epoch() != (0, 0):
            entries.append(pack_entry(EPOCH_KEY, self._epoch_fields()))
        for name in self._table.names():
            entry = None if name in unflushed else packed.get(name)
            if entry is None:
                state = self._table.state(name)
                if state is None:
                    continue
                entry = pack_entry(PREFIX + name, encode(state))
                if name not in unflushed:
                    packed[name] = entry
            entries.append(entry)
        return entries

    def _epoch_fields(self) -> dict[str, str]:
        # Absent from dumps while (0, 0): a store from before lease epochs has no such hash.
        return encode_epoch(*self._table.lease_epoch())

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        """Replace the state; raises ValueError on a malformed hash (a corrupt store
        must stop the node at start, not be half-loaded)."""
        self._packed.clear()
        locks = [
            decode(key[len(PREFIX) :], fields)
            for key, fields in hashes.items()
            if key.startswith(PREFIX) and key != EPOCH_KEY
        ]
        epoch = hashes.get(EPOCH_KEY)
        self._table.replace_all(locks, decode_epoch(epoch) if epoch is not None else (0, 0))

    # --- for the lock service ----------------------------------------------------------

    def take_events(self) -> list[LockEvent]:
        """Grants and dropped waits caused by commands since the last call, in order.

        Every replica produces the same events; the service uses them to answer the
        HTTP requests waiting for these locks. Drain after every applied batch.
        """
        return self._table.take_events()

    def get(self, name: str) -> LockView | None:
        return self._table.get(name)

    def hold_of(self, name: str, owner: str) -> Granted | None:
        return self._table.hold_of(name, owner)

    def is_waiting(self, name: str, owner: str, seq: int) -> bool:
        return self._table.is_waiting(name, owner, seq)

    def all_held(self) -> list[LockView]:
        return self._table.all_held()

    def held_page(self, after: str | None, limit: int) -> tuple[list[LockView], bool]:
        return self._table.held_page(after, limit)

    def validate(self, name: str, token: int) -> bool:
        return self._table.validate(name, token)

    def held_count(self) -> int:
        return self._table.held_count()

    def expired(self, now_ms: int, limit: int | None = None) -> list[Due]:
        """Holds to propose `lock.expire` for, earliest first (`Due.ident` is the token)."""
        return self._table.expired(now_ms, limit)

    def expired_waits(self, now_ms: int, limit: int | None = None) -> list[Due]:
        """Waits to propose `lock.expire_wait` for, earliest first (`Due.ident` is the
        seq)."""
        return self._table.expired_waits(now_ms, limit)

    def wait_for_graph(self) -> dict[str, tuple[str, ...]]:
        return self._table.wait_for_graph()

    # --- handlers ----------------------------------------------------------------------

    def _acquire(self, index: int, command: Command, args: Mapping[str, Any]) -> Result:
        a = parse_acquire(args)
        outcome = self._table.acquire(
            index, command.now_ms, a.name, a.owner, a.mode, a.ttl_ms, a.wait, a.wait_ms
        )
        return results.acquire(outcome)

    def _release(self, index: int, command: Command, args: Mapping[str, Any]) -> Result:
        r = parse_hold_ref(args)
        outcome = self._table.release(index, command.now_ms, r.name, r.owner, r.token)
        return results.status(outcome.value)

    def _keepalive(self, index: int, command: Command, args: Mapping[str, Any]) -> Result:
        k = parse_keepalive(args)
        grant = self._table.keepalive(command.now_ms, k.name, k.owner, k.token, k.ttl_ms)
        return results.keepalive(grant)

    def _expire(self, index: int, command: Command, args: Mapping[str, Any]) -> Result:
        r = parse_hold_ref(args)
        done = self._table.expire(index, command.now_ms, r.name, r.owner, r.token)
        return results.status("expired" if done else "noop")

    def _cancel_wait(self, index: int, command: Command, args: Mapping[str, Any]) -> Result:
        w = parse_wait_ref(args)
        outcome = self._table.cancel_wait(index, command.now_ms, w.name, w.owner, w.seq)
        return results.cancel(outcome)

    def _expire_wait(self, index: int, command: Command, args: Mapping[str, Any]) -> Result:
        w = parse_wait_ref(args)
        if w.seq is None:
            raise BadCommand("seq is required (from expired_waits)")
        done = self._table.expire_wait(index, command.now_ms, w.name, w.owner, w.seq)
        return results.status("expired" if done else "noop")

    def _leader_change(self, index: int, command: Command, args: Mapping[str, Any]) -> Result:
        now_ms = parse_now(args, command.now_ms)
        holds, waits = self._table.leader_change(now_ms)
        return {"status": "ok", "holds": holds, "waits": waits}
