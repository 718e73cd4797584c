"""Protocol messages on the wire between nodes: compact msgpack-ready lists, checked on
the way in.

A message travels as `[type name, field1, field2, ...]` in the dataclass's field order
(enums as their value), which is about a third of the size of a field-named map and as
fast to build. Decoding checks the type name, the field count and every field's type, so a
malformed or hostile batch is refused with a ValueError instead of reaching the cores.
A receiver accepts a message with fewer trailing fields than it knows (the optional ones
take their defaults), so a field added later with a default stays compatible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from typing import Any

from service.cache.messages import (
    Data,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    Inv,
    InvAck,
    Message,
    PutAck,
    PutE,
    PutM,
    PutS,
    State,
    Unblock,
)

_MESSAGE_TYPES: tuple[type[Message], ...] = (
    GetS,
    GetM,
    PutS,
    PutE,
    PutM,
    InvAck,
    FwdDone,
    Unblock,
    Data,
    Inv,
    FwdGetS,
    FwdGetM,
    PutAck,
)
MAX_NAME_BYTES = 1024  # keys are at most 512 bytes (the API's limit), node ids far less


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME_BYTES:
        raise ValueError("expected a short string")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a non-negative integer")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected a boolean")
    return value


def _json_text(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError("expected JSON text or nil")
    return value


def _state(value: Any) -> State:
    return State(value)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "key": _text,
    "sender": _text,
    "requester": _text,
    "txn": _count,
    "version": _count,
    "lease_ms": _count,
    "req": _count,
    "dirty": _flag,
    "has_data": _flag,
    "kept": _flag,
    "data": _json_text,
    "state": _state,
}


class _Shape:
    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        self.names = [f.name for f in fields(cls)]
        self.checks = [_CHECKS[name] for name in self.names]
        self.required = sum(
            1 for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        )


_SHAPES = {cls.__name__: _Shape(cls) for cls in _MESSAGE_TYPES}


def encode(message: Message) -> list[Any]:
    out: list[Any] = [type(message).__name__]
    for name in _SHAPES[type(message).__name__].names:
        value = getattr(message, name)
        out.append(value.value if isinstance(value, State) else value)
    return out


def decode(raw: Any) -> Message:
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes) or not raw:
        raise ValueError("a message is a non-empty list")
    shape = _SHAPES.get(raw[0]) if isinstance(raw[0], str) else None
    if shape is None:
        raise ValueError(f"unknown message type {str(raw[0])[:40]!r}")
    values = raw[1:]
    if not shape.required <= len(values) <= len(shape.names):
        raise ValueError(f"{shape.cls.__name__} needs {shape.required}-{len(shape.names)} fields")
    try:
        args = [check(value) for check, value in zip(shape.checks, values, strict=False)]
    except ValueError as exc:
        raise ValueError(f"{shape.cls.__name__}: {exc}") from exc
    message: Message = shape.cls(*args)
    return message


__all__ = ["decode", "encode"]
