"""Exactly-once application of client commands: a bounded request_id -> result table.

A client (or a forwarding node) may propose the same command twice: a retry after a
timeout, a leader change, a lost reply. Both copies can commit. `Deduplicated` wraps any
StateMachine so the second copy returns the first copy's stored result without being
applied again.

The table is itself part of the replicated state: it changes only when a command is
applied, it is materialised in Redis (one hash per namespace, `dsync:req:<namespace>`,
field = request_id, value = JSON `{"index", "op", "args", "result"}`) and snapshotted
like any other machine. It is bounded: past `max_entries` per namespace the entry with
the oldest log index is forgotten (deterministically: every replica forgets the same
one), so a retry arriving after 10,000 newer requests is applied again. Keep retry
windows short, and make request ids unique per client (UUIDs): ids are global within a
namespace, and a reused id with different arguments is refused, never answered with
someone else's result.

Wiring: one `DedupTable` is registered with the runner as a StateMachine of its own
(prefix `dsync:req:`, it handles no ops) so the runner loads, materialises and snapshots
it; each service machine is registered wrapped: `Deduplicated(machine, table, "lock")`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.machines import packed_dump
from service.statemachine import Command, StateMachine
from service.storage.protocols import HashWrite

DEDUP_PREFIX = "dsync:req:"
DEFAULT_MAX_ENTRIES = 10_000
MAX_REQUEST_ID_BYTES = 256


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    op: str
    args_digest: str
    result_json: str
    # The stored form, made once: it is written to Redis when the entry is recorded
    # and again in every snapshot, which holds the event loop while it dumps the
    # whole table (10,000 entries by default).
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self._encode())

    def encode(self) -> str:
        return self.text

    def _encode(self) -> str:
        # The result is embedded as JSON (not a string of JSON) so `HGET` shows it
        # readably. Spliced rather than re-parsed and re-dumped: this runs for every
        # applied command that carries a request_id. Keys in sorted order, as before.
        return (
            f'{{"args":{json.dumps(self.args_digest)},"index":{self.index},'
            f'"op":{json.dumps(self.op)},"result":{self.result_json}}}'
        )

    @staticmethod
    def decode(text: str) -> _Entry:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        index, op, digest = record["index"], record["op"], record["args"]
        if not (isinstance(index, int) and isinstance(op, str) and isinstance(digest, str)):
            raise ValueError("index, op or args has the wrong type")
        return _Entry(index, op, digest, _to_json(record["result"]))


# Built once: json.dumps with any non-default option builds a new encoder per call, and
# every replica runs both for every applied command that carries a request_id.
_RESULT_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, allow_nan=False)


def _to_json(value: Any) -> str:
    return _RESULT_ENCODER.encode(value)


def _canonical(value: object) -> object:
    # Only for fingerprints: map what JSON lacks onto something it has.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, bytes | bytearray):
        return {"bytes": value.hex()}
    raise TypeError(f"{type(value).__name__} is not fingerprintable")


_ARGS_ENCODER = json.JSONEncoder(sort_keys=True, default=_canonical)


def _digest(args: Any) -> str:
    """A fingerprint of the arguments, identical on every replica for equal args (key
    order does not matter: a retry may re-encode its arguments)."""
    try:
        canonical = _ARGS_ENCODER.encode(args)
    except (TypeError, ValueError):
        # Mixed-type keys and the like: repr is still deterministic for the plain
        # values a decoded log entry can hold.
        canonical = repr(args)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class DedupTable:
    """Per-namespace bounded maps request_id -> (index, op, args digest, result)."""

    prefix: str = DEDUP_PREFIX

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        # namespace -> request_id -> entry, in log-index order (dict insertion order).
        # An OrderedDict: evicting the oldest is popitem(last=False), O(1); deleting the
        # first key of a plain dict makes the next next(iter()) skip the holes it left.
        self._spaces: dict[str, OrderedDict[str, _Entry]] = {}
        # namespace -> request_id -> new value, or None for "delete the field".
        self._pending: dict[str, dict[str, str | None]] = {}

    # --- StateMachine protocol (it owns state but no ops) -------------------------------

    def handles(self, op: str) -> bool:
        return False

    def apply(self, index: int, command: Command) -> dict[str, Any]:
        return {"status": "error", "code": "unknown_op", "message": "dedup handles no ops"}

    def take_writes(self) -> list[HashWrite]:
        writes: list[HashWrite] = []
        for namespace in sorted(self._pending):
            changes = self._pending[namespace]
            fields = {k: v for k, v in changes.items() if v is not None}
            deleted = tuple(sorted(k for k, v in changes.items() if v is None))
            writes.append(HashWrite(self.key(namespace), fields, deleted))
        self._pending.clear()
        return writes

    def dump(self) -> dict[str, dict[str, str]]:
        return {
            self.key(ns): {rid: entry.encode() for rid, entry in entries.items()}
            for ns, entries in sorted(self._spaces.items())
            if entries
        }

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        """Replace the state; ValueError on a malformed entry."""
        spaces: dict[str, OrderedDict[str, _Entry]] = {}
        for key, fields in hashes.items():
            if not key.startswith(self.prefix):
                continue
            namespace = key[len(self.prefix) :]
            decoded: list[tuple[str, _Entry]] = []
            for rid, text in fields.items():
                try:
                    decoded.append((rid, _Entry.decode(text)))
                except (ValueError, KeyError) as exc:
                    raise ValueError(f"malformed dedup entry {key!r} {rid!r}: {exc}") from exc
            decoded.sort(key=lambda item: item[1].index)
            spaces[namespace] = OrderedDict(decoded)
        self._spaces = spaces
        self._pending = {}
        for namespace in sorted(self._spaces):
            self._evict(namespace)

    # --- used by Deduplicated ----------------------------------------------------------

    def key(self, namespace: str) -> str:
        return self.prefix + namespace

    def lookup(self, namespace: str, request_id: str) -> _Entry | None:
        entries = self._spaces.get(namespace)
        return entries.get(request_id) if entries is not None else None

    def record(
        self, namespace: str, request_id: str, index: int, command: Command, result: Any
    ) -> None:
        try:
            result_json = _to_json(result)
        except (TypeError, ValueError):
            # Cannot store this result; store a refusal instead so a retry is never
            # applied a second time (at-most-once beats a silent double apply).
            result_json = _to_json(
                {
                    "status": "error",
                    "code": "duplicate_request",
                    "message": f"request already applied at index {index}; "
                    "its result cannot be replayed",
                }
            )
        entry = _Entry(index, command.op, _digest(command.args), result_json)
        self._spaces.setdefault(namespace, OrderedDict())[request_id] = entry
        self._pending.setdefault(namespace, {})[request_id] = entry.encode()
        self._evict(namespace)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._spaces.values())

    def _evict(self, namespace: str) -> None:
        entries = self._spaces.get(namespace)
        if entries is None:
            return
        while len(entries) > self._max_entries:
            oldest, _ = entries.popitem(last=False)
            self._pending.setdefault(namespace, {})[oldest] = None


class Deduplicated:
    """Wraps a StateMachine so a command whose request_id was seen returns the stored
    result instead of being applied again. Commands without a request_id pass through."""

    def __init__(self, inner: StateMachine, table: DedupTable, namespace: str) -> None:
        self.inner = inner
        self.table = table
        self.namespace = namespace
        self.prefix: str = inner.prefix

    def handles(self, op: str) -> bool:
        return self.inner.handles(op)

    def apply(self, index: int, command: Command) -> Any:
        request_id = command.request_id
        if request_id is None:
            return self.inner.apply(index, command)
        if not isinstance(request_id, str) or not _fits(request_id):
            return {
                "status": "error",
                "code": "bad_request_id",
                "message": f"request_id must be a string of 1 to {MAX_REQUEST_ID_BYTES} bytes",
            }
        seen = self.table.lookup(self.namespace, request_id)
        if seen is None:
            result = self.inner.apply(index, command)
            self.table.record(self.namespace, request_id, index, command, result)
            return result
        if seen.op != command.op or seen.args_digest != _digest(command.args):
            return {
                "status": "error",
                "code": "request_id_reused",
                "message": f"request_id {request_id!r} was already used for a different "
                "command; use a fresh id for every new request",
            }
        return json.loads(seen.result_json)

    def take_writes(self) -> list[HashWrite]:
        return self.inner.take_writes()

    def dump(self) -> dict[str, dict[str, str]]:
        return self.inner.dump()

    def packed_dump(self) -> list[bytes]:
        return packed_dump(self.inner)

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        self.inner.load(hashes)


def _fits(request_id: str) -> bool:
    try:
        return 0 < len(request_id.encode("utf-8")) <= MAX_REQUEST_ID_BYTES
    except UnicodeEncodeError:
        return False
