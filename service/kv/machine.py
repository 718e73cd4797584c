"""A replicated key-value register: the smallest useful state machine.

It backs `/v1/kv/{key}` (an addition to the API for operators and for linearizability
tests: a register is the easiest history to check) and exercises the full path
propose -> commit -> apply -> materialise. Each key is one hash `dsync:kv:<key>` with
`value` and `version` (the log index of the last write, so versions only grow).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.statemachine import Command
from service.storage.protocols import HashWrite

PREFIX = "dsync:kv:"


class KvStateMachine:
    prefix = PREFIX

    def __init__(self) -> None:
        self._data: dict[str, tuple[str, int]] = {}
        self._dirty: set[str] = set()

    def handles(self, op: str) -> bool:
        return op.startswith("kv.")

    def get(self, key: str) -> tuple[str, int] | None:
        return self._data.get(key)

    def apply(self, index: int, command: Command) -> Any:
        key = command.args.get("key")
        if not isinstance(key, str) or not key:
            return {"status": "error", "code": "bad_request", "message": "key required"}
        if command.op == "kv.put":
            value = command.args.get("value")
            if not isinstance(value, str):
                return {"status": "error", "code": "bad_request", "message": "value must be str"}
            expected = command.args.get("expected_version")
            current = self._data.get(key)
            if expected is not None and (current[1] if current else 0) != expected:
                return {"status": "conflict", "version": current[1] if current else 0}
            self._data[key] = (value, index)
            self._dirty.add(key)
            return {"status": "ok", "version": index}
        if command.op == "kv.delete":
            existed = self._data.pop(key, None) is not None
            self._dirty.add(key)
            return {"status": "ok" if existed else "not_found"}
        return {"status": "error", "code": "unknown_op", "message": command.op}

    def take_writes(self) -> list[HashWrite]:
        writes = []
        for key in sorted(self._dirty):
            item = self._data.get(key)
            if item is None:
                writes.append(HashWrite(PREFIX + key, {}, drop=True))
            else:
                writes.append(
                    HashWrite(PREFIX + key, {"value": item[0], "version": str(item[1])}, drop=True)
                )
        self._dirty.clear()
        return writes

    def dump(self) -> dict[str, dict[str, str]]:
        return {PREFIX + k: {"value": v, "version": str(ver)} for k, (v, ver) in self._data.items()}

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        self._data = {
            key[len(PREFIX) :]: (fields["value"], int(fields["version"]))
            for key, fields in hashes.items()
            if key.startswith(PREFIX) and "value" in fields
        }
        self._dirty.clear()
