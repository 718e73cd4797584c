"""The operations of a partition's replicated op stream, and their compact encoding.

The partition leader turns requests into ops; every replica (the leader included) applies
the same ops in the same order to the same `PartitionState`, so replicas stay identical
without a consensus round per message. Ops are deterministic: every value they need (the
offset, the leader's clock) is inside them.

Each op travels as a short list, `[tag, ...fields]`, in msgpack between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class OpDecodeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Publish:
    offset: int
    id: str
    key: str | None
    body: str  # the message body as JSON text, stored as-is


@dataclass(frozen=True, slots=True)
class Deliver:
    """A (re)delivery of `offset` to `consumer` in `group`, invisible until visible_at."""

    group: str
    offset: int
    consumer: str
    visible_at: int
    visibility_ms: int
    count: int


@dataclass(frozen=True, slots=True)
class Ack:
    group: str
    offset: int


@dataclass(frozen=True, slots=True)
class Nack:
    """Make a pending delivery visible again at visible_at (now + the nack's delay)."""

    group: str
    offset: int
    visible_at: int


@dataclass(frozen=True, slots=True)
class Dead:
    """The message passed the delivery limit in this group: moved to the dead letters."""

    group: str
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Trim:
    """Every group is done with offsets <= upto: the messages may be dropped."""

    upto: int


@dataclass(frozen=True, slots=True)
class Rebase:
    """A new partition leader took over: every pending delivery gets its full visibility
    on the new leader's clock (deadlines of another machine's clock mean nothing here)."""

    now: int


Op = Publish | Deliver | Ack | Nack | Dead | Trim | Rebase

_TAGS: dict[type[Any], str] = {
    Publish: "p",
    Deliver: "d",
    Ack: "a",
    Nack: "n",
    Dead: "x",
    Trim: "t",
    Rebase: "r",
}
_BY_TAG: dict[str, type[Any]] = {tag: cls for cls, tag in _TAGS.items()}
_FIELDS: dict[str, tuple[type, ...]] = {
    "p": (int, str, (str, type(None)), str),  # type: ignore[dict-item]
    "d": (str, int, str, int, int, int),
    "a": (str, int),
    "n": (str, int, int),
    "x": (str, int, int),
    "t": (int,),
    "r": (int,),
}


def encode_op(op: Op) -> list[Any]:
    return [_TAGS[type(op)], *(getattr(op, f) for f in op.__slots__)]


def decode_op(raw: Any) -> Op:
    if not isinstance(raw, list | tuple) or not raw or not isinstance(raw[0], str):
        raise OpDecodeError(f"op is not a tagged list: {raw!r}")
    tag, fields = raw[0], list(raw[1:])
    cls, types = _BY_TAG.get(tag), _FIELDS.get(tag)
    if cls is None or types is None:
        raise OpDecodeError(f"unknown op tag {tag!r}")
    if len(fields) != len(types):
        raise OpDecodeError(f"op {tag!r} has {len(fields)} fields, expected {len(types)}")
    for value, expected in zip(fields, types, strict=True):
        if isinstance(value, bool) or not isinstance(value, expected):
            raise OpDecodeError(f"op {tag!r} field {value!r} has the wrong type")
    op: Op = cls(*fields)
    return op
