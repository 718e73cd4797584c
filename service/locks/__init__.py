"""Distributed lock manager: a deterministic lock table applied from the Raft log.

`table` holds the rules, `machine` adapts them to the runner's StateMachine protocol,
`codec` is the Redis hash format, `commands`/`results` the command and result shapes.
"""

from service.locks.commands import MAX_NAME_BYTES, MAX_OWNER_BYTES, MAX_TTL_MS
from service.locks.machine import PREFIX, LockStateMachine
from service.locks.table import (
    Due,
    Granted,
    Hold,
    LockEvent,
    LockTable,
    LockView,
    Mode,
    WaitDropped,
    Waiter,
)

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_OWNER_BYTES",
    "MAX_TTL_MS",
    "PREFIX",
    "Due",
    "Granted",
    "Hold",
    "LockEvent",
    "LockStateMachine",
    "LockTable",
    "LockView",
    "Mode",
    "WaitDropped",
    "Waiter",
]
