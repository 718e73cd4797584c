"""Small helpers for picking actions apart in assertions."""

from __future__ import annotations

from service.cache import (
    Action,
    Message,
    PersistEntry,
    PersistLine,
    ReadDone,
    Send,
    WriteDone,
)


def messages(actions: list[Action]) -> list[Message]:
    return [a.message for a in actions if isinstance(a, Send)]


def sends(actions: list[Action]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def persisted(actions: list[Action]) -> dict[str, dict[str, str] | None]:
    out: dict[str, dict[str, str] | None] = {}
    for a in actions:
        if isinstance(a, PersistLine | PersistEntry):
            out[a.key] = a.fields
    return out


def replies(actions: list[Action]) -> list[ReadDone | WriteDone]:
    return [a for a in actions if isinstance(a, ReadDone | WriteDone)]
