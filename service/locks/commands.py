"""Parsing raw `lock.*` command arguments into typed values.

The API layer validates requests before proposing them, but a log entry is applied on
every replica forever after, so the machine re-checks everything: a malformed command
must become an error result, never an exception (an exception would stop every replica
at the same index).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.locks.table import Mode

MAX_NAME_BYTES = 256
MAX_OWNER_BYTES = 256
# Leases and waits longer than a week are almost certainly a unit mistake (s vs ms).
MAX_TTL_MS = 7 * 24 * 3600 * 1000
# Tokens and sequence numbers are log indexes; anything past 2**63 cannot be one.
MAX_INDEX = 2**63 - 1


class BadCommand(ValueError):
    """The command's arguments are missing, mistyped or out of range."""


@dataclass(frozen=True, slots=True)
class Acquire:
    name: str
    owner: str
    mode: Mode
    ttl_ms: int
    wait: bool
    wait_ms: int  # 0: no explicit wait budget (the waiter gets ttl_ms)


@dataclass(frozen=True, slots=True)
class HoldRef:
    """release / expire: one hold, named by its owner and token."""

    name: str
    owner: str
    token: int


@dataclass(frozen=True, slots=True)
class Keepalive:
    name: str
    owner: str
    token: int
    ttl_ms: int | None


@dataclass(frozen=True, slots=True)
class WaitRef:
    """cancel_wait (seq optional) / expire_wait (seq required): one waiter."""

    name: str
    owner: str
    seq: int | None


def parse_acquire(args: Mapping[str, Any]) -> Acquire:
    return Acquire(
        name=_text(args, "name", MAX_NAME_BYTES),
        owner=_text(args, "owner", MAX_OWNER_BYTES),
        mode=_mode(args.get("mode", Mode.EXCLUSIVE.value)),
        ttl_ms=_int(args, "ttl_ms", 1, MAX_TTL_MS),
        wait=_bool(args, "wait", default=False),
        wait_ms=_optional_int(args, "wait_ms", 0, MAX_TTL_MS) or 0,
    )


def parse_hold_ref(args: Mapping[str, Any]) -> HoldRef:
    return HoldRef(
        name=_text(args, "name", MAX_NAME_BYTES),
        owner=_text(args, "owner", MAX_OWNER_BYTES),
        token=_int(args, "token", 0, MAX_INDEX),
    )


def parse_keepalive(args: Mapping[str, Any]) -> Keepalive:
    return Keepalive(
        name=_text(args, "name", MAX_NAME_BYTES),
        owner=_text(args, "owner", MAX_OWNER_BYTES),
        token=_int(args, "token", 0, MAX_INDEX),
        ttl_ms=_optional_int(args, "ttl_ms", 1, MAX_TTL_MS),
    )


def parse_wait_ref(args: Mapping[str, Any]) -> WaitRef:
    return WaitRef(
        name=_text(args, "name", MAX_NAME_BYTES),
        owner=_text(args, "owner", MAX_OWNER_BYTES),
        seq=_optional_int(args, "seq", 0, MAX_INDEX),
    )


def parse_now(args: Mapping[str, Any], default: int) -> int:
    """leader_change may carry its clock in args; otherwise the command's now_ms."""
    value = args.get("now_ms", default)
    if not _is_int(value):
        raise BadCommand("now_ms must be an integer")
    return int(value)


def _text(args: Mapping[str, Any], key: str, max_bytes: int) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise BadCommand(f"{key} must be a non-empty string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates cannot be stored in Redis
        raise BadCommand(f"{key} is not valid UTF-8 text") from exc
    if size > max_bytes:
        raise BadCommand(f"{key} is {size} bytes; the limit is {max_bytes}")
    return value


def _mode(value: object) -> Mode:
    if value == Mode.EXCLUSIVE.value:
        return Mode.EXCLUSIVE
    if value == Mode.SHARED.value:
        return Mode.SHARED
    raise BadCommand('mode must be "exclusive" or "shared"')


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a TTL is a caller bug, not 1 ms.
    return isinstance(value, int) and not isinstance(value, bool)


def _int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = _optional_int(args, key, lo, hi)
    if value is None:
        raise BadCommand(f"{key} is required")
    return value


def _optional_int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise BadCommand(f"{key} must be an integer")
    if not lo <= value <= hi:
        raise BadCommand(f"{key} must be between {lo} and {hi}")
    return int(value)


def _bool(args: Mapping[str, Any], key: str, default: bool) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise BadCommand(f"{key} must be true or false")
    return value
