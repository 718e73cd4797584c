"""Cached values travel and rest as canonical JSON text, never as live Python objects.

Why text: a stored `str` is immutable, so no caller can change a cached value behind the
protocol's back; its byte size (what the capacity counts) is simply the UTF-8 length; and
it goes into a Redis hash field as it is. Canonical (sorted keys, no spaces) so two nodes
encode an equal value identically. `None` (no text at all) means "the key is absent":
a deleted or never-written key is cached, versioned and invalidated like any other value,
which keeps JSON `null` (the text "null") distinct from absence.
"""

from __future__ import annotations

import json
from typing import TypeAlias

Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"


def encode(value: Json) -> str:
    """Canonical JSON text of `value`; ValueError if it is not JSON (NaN, sets, bytes...)."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cache values must be JSON: {exc}") from exc


def decode(text: str) -> Json:
    value: Json = json.loads(text)
    return value


def size(text: str | None) -> int:
    """Bytes a value occupies in a cache: its JSON encoding (0 for an absent key)."""
    return 0 if text is None else len(text.encode())
