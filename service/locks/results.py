"""The result dicts lock commands return to their proposer.

Plain str/int/bool/list values only, so a result survives msgpack (Raft forwarding) and
JSON (the dedup table) unchanged. Every result has a "status"; errors also carry a
snake_case "code" and a "message" the API layer can pass through.

    acquire     granted {name, owner, mode, token, ttl_ms, expires_at_ms}
                queued  {name, owner, mode, seq, position, wait_deadline_ms}
                held    {name}                     (try-lock lost; wait was false)
                deadlock {name, cycle: [owner...]} (each waits for the next, last for first)
                error   {code: mode_conflict, current_mode, waiting}
    release     released | not_held | stale_token
    keepalive   ok {token, ttl_ms, expires_at_ms} | not_held
    expire      expired | noop
    cancel_wait cancelled | not_waiting | granted {...} (it was granted before the cancel)
    expire_wait expired | noop
    leader_change ok {holds, waits}
    any         error {code: bad_command | unknown_op | internal, message}
"""

from __future__ import annotations

from typing import Any

from service.locks.table import (
    AcquireOutcome,
    CancelOutcome,
    Deadlock,
    Granted,
    Held,
    ModeConflict,
    Queued,
)

Result = dict[str, Any]


def error(code: str, message: str, **extra: Any) -> Result:
    return {"status": "error", "code": code, "message": message, **extra}


def status(value: str) -> Result:
    return {"status": value}


def granted(g: Granted) -> Result:
    return {
        "status": "granted",
        "name": g.name,
        "owner": g.owner,
        "mode": g.mode.value,
        "token": g.token,
        "ttl_ms": g.ttl_ms,
        "expires_at_ms": g.expires_at_ms,
    }


def acquire(outcome: AcquireOutcome) -> Result:
    match outcome:
        case Granted():
            return granted(outcome)
        case Queued():
            return {
                "status": "queued",
                "name": outcome.name,
                "owner": outcome.owner,
                "mode": outcome.mode.value,
                "seq": outcome.seq,
                "position": outcome.position,
                "wait_deadline_ms": outcome.deadline_ms,
            }
        case Held():
            return {"status": "held", "name": outcome.name}
        case Deadlock():
            return {"status": "deadlock", "name": outcome.name, "cycle": list(outcome.cycle)}
        case ModeConflict():
            what = "waits for" if outcome.waiting else "holds"
            return error(
                "mode_conflict",
                f"{outcome.owner!r} already {what} {outcome.name!r} in {outcome.current} mode;"
                f" release it (or cancel the wait) before asking for {outcome.requested} mode",
                current_mode=outcome.current.value,
                waiting=outcome.waiting,
            )


def keepalive(grant: Granted | None) -> Result:
    if grant is None:
        return status("not_held")
    return {
        "status": "ok",
        "token": grant.token,
        "ttl_ms": grant.ttl_ms,
        "expires_at_ms": grant.expires_at_ms,
    }


def cancel(outcome: CancelOutcome | Granted) -> Result:
    if isinstance(outcome, Granted):
        return granted(outcome)
    return status(outcome.value)
