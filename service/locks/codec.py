"""How one lock is materialised as a Redis hash `dsync:lock:<name>` (and read back).

`HGETALL dsync:lock:mylock` on a busy lock reads:

    mode          exclusive | shared
    last_token    57                         fencing token of the latest grant
    holder:alice  57|exclusive|30000|812345@3  token|mode|ttl_ms|expires_at_ms@epoch
    waiter:61     bob|shared|30000|10000|...@3 owner|mode|ttl_ms|wait_ms|deadline_ms@epoch

`waiter:<seq>`: seq is the log index of the acquire that queued it; FIFO order is seq
order. A free lock keeps only `mode free`, `last_token` and `freed_at` (the index that
freed it, which orders forgetting old free locks). Times are on the current leader's
monotonic clock (see `LockTable.leader_change`), not wall-clock time.

`@epoch` is the lease epoch the deadline was set in (absent: epoch 0, as written before
epochs existed). The hash `dsync:lock:` (the empty name, which no lock can have) holds
the current epoch and the clock it began at: `epoch 3`, `now_ms 811000`. A deadline
from an earlier epoch counts from there: `now_ms + ttl_ms` (waits: `+ wait_ms`).
"""

from __future__ import annotations

from collections.abc import Mapping

from service.locks.table import FieldChanges, Hold, LockState, Mode, Waiter, compatible

FREE = "free"
HOLDER = "holder:"
WAITER = "waiter:"


def encode(lock: LockState) -> dict[str, str]:
    fields = _header(lock)
    for h in lock.holders.values():
        fields[HOLDER + h.owner] = _hold_value(h)
    for w in lock.waiters:
        fields[WAITER + str(w.seq)] = _wait_value(w)
    return fields


def encode_changes(lock: LockState, changes: FieldChanges) -> tuple[dict[str, str], list[str]]:
    """The fields to set and to delete in the hash `encode` wrote earlier for `lock`,
    so that it equals `encode(lock)` again after `changes` (header fields always)."""
    fields = _header(lock)
    deleted: list[str] = ["freed_at"] if lock.busy else []
    for owner in sorted(changes.holders):
        h = lock.holders.get(owner)
        if h is None:
            deleted.append(HOLDER + owner)
        else:
            fields[HOLDER + owner] = _hold_value(h)
    for seq in sorted(changes.waiters):
        pos = lock.waiter_index(seq)
        if pos is None:
            deleted.append(WAITER + str(seq))
        else:
            fields[WAITER + str(seq)] = _wait_value(lock.waiters[pos])
    return fields, deleted


def _header(lock: LockState) -> dict[str, str]:
    mode = lock.mode
    fields = {"mode": mode.value if mode is not None else FREE, "last_token": str(lock.last_token)}
    if not lock.busy:
        fields["freed_at"] = str(lock.freed_at)
    return fields


def _hold_value(h: Hold) -> str:
    return f"{h.token}|{h.mode.value}|{h.ttl_ms}|{_time(h.expires_at_ms, h.epoch)}"


def _wait_value(w: Waiter) -> str:
    return f"{w.owner}|{w.mode.value}|{w.ttl_ms}|{w.wait_ms}|{_time(w.deadline_ms, w.epoch)}"


def _time(ms: int, epoch: int) -> str:
    return f"{ms}@{epoch}" if epoch else str(ms)


def _parse_time(text: str) -> tuple[int, int]:
    ms, _, epoch = text.partition("@")
    return int(ms), int(epoch or 0)


def encode_epoch(epoch: int, now_ms: int) -> dict[str, str]:
    """The lease epoch's hash (`LockTable.lease_epoch`)."""
    return {"epoch": str(epoch), "now_ms": str(now_ms)}


def decode_epoch(fields: Mapping[str, str]) -> tuple[int, int]:
    try:
        epoch, now_ms = int(fields["epoch"]), int(fields["now_ms"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed lease epoch hash: {dict(fields)!r}") from exc
    if epoch < 0:
        raise ValueError(f"negative lease epoch {epoch}")
    return epoch, now_ms


def decode(name: str, fields: Mapping[str, str]) -> LockState:
    """Rebuild a lock from its hash; ValueError (naming the lock) if it is malformed."""
    try:
        lock = _decode(name, fields)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"malformed lock hash for {name!r}: {exc}") from exc
    problems = invariant_violations(lock)
    if problems:
        raise ValueError(f"inconsistent lock hash for {name!r}: {'; '.join(problems)}")
    return lock


def _decode(name: str, fields: Mapping[str, str]) -> LockState:
    lock = LockState(name, last_token=int(fields["last_token"]))
    waiters: list[Waiter] = []
    for key, value in fields.items():
        if key.startswith(HOLDER):
            owner = key[len(HOLDER) :]
            token, mode, ttl, expires = value.split("|")
            at, epoch = _parse_time(expires)
            lock.holders[owner] = Hold(owner, Mode(mode), int(token), int(ttl), at, epoch)
        elif key.startswith(WAITER):
            # The owner comes first and may itself contain "|": split from the right.
            owner, mode, ttl, wait, deadline = value.rsplit("|", 4)
            seq = int(key[len(WAITER) :])
            at, epoch = _parse_time(deadline)
            waiters.append(Waiter(seq, owner, Mode(mode), int(ttl), int(wait), at, epoch))
        elif key not in ("mode", "last_token", "freed_at"):
            raise ValueError(f"unknown field {key!r}")
    lock.waiters = sorted(waiters, key=lambda w: w.seq)
    # Holders in grant order, so iteration order matches a replica that never restarted.
    lock.holders = {h.owner: h for h in lock.sorted_holders()}
    if not lock.busy:
        lock.freed_at = int(fields["freed_at"])
    expected = lock.mode.value if lock.mode is not None else FREE
    if fields.get("mode") != expected:
        raise ValueError(f"mode field {fields.get('mode')!r} but holders say {expected!r}")
    return lock


def invariant_violations(lock: LockState) -> list[str]:
    """Rules every lock state satisfies; checked on load and by the tests."""
    problems: list[str] = []
    modes = {h.mode for h in lock.holders.values()}
    if Mode.EXCLUSIVE in modes and len(lock.holders) > 1:
        problems.append("an exclusive holder alongside another holder")
    if lock.waiters and not lock.holders:
        problems.append("waiters but no holders")
    if lock.waiters and compatible(lock.waiters[0].mode, lock.holders):
        problems.append("the head waiter is grantable")
    owners = [w.owner for w in lock.waiters]
    if len(set(owners)) != len(owners) or set(owners) & set(lock.holders):
        problems.append("an owner waits twice, or waits on a lock it holds")
    seqs = [w.seq for w in lock.waiters]
    if seqs != sorted(set(seqs)):
        problems.append("waiters not in strictly increasing seq order")
    if any(h.token > lock.last_token for h in lock.holders.values()):
        problems.append("a holder's token is above last_token")
    if any(w.ttl_ms <= 0 or w.wait_ms <= 0 for w in lock.waiters) or any(
        h.ttl_ms <= 0 for h in lock.holders.values()
    ):
        problems.append("a non-positive ttl or wait budget")
    return problems
