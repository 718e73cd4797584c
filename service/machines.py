"""Routes committed commands to the state machine that owns their op.

The registry is what the runner applies to; it presents all machines as one: their writes
are collected together (one Redis transaction per loop turn) and their dumps merged into
one snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from service.snapshot_entries import join_entries, pack_entry
from service.statemachine import Command, StateMachine
from service.storage.protocols import HashWrite


@runtime_checkable
class PacksItsDump(Protocol):
    """A state machine that can hand its dump over already packed for a snapshot."""

    def packed_dump(self) -> list[bytes]:
        """`pack_entry(key, fields)` for every item of `dump()`."""
        ...


def packed_dump(machine: StateMachine) -> list[bytes]:
    """The machine's dump as packed snapshot entries, from the machine when it can."""
    if isinstance(machine, PacksItsDump):
        return machine.packed_dump()
    return [pack_entry(key, fields) for key, fields in machine.dump().items()]


class MachineRegistry:
    def __init__(self, machines: Sequence[StateMachine]) -> None:
        prefixes = [m.prefix for m in machines]
        for i, a in enumerate(prefixes):
            for b in prefixes[i + 1 :]:
                if a.startswith(b) or b.startswith(a):
                    raise ValueError(f"state machine prefixes overlap: {a!r} and {b!r}")
        self.machines = list(machines)

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(m.prefix for m in self.machines)

    def machine_for(self, op: str) -> StateMachine | None:
        for machine in self.machines:
            if machine.handles(op):
                return machine
        return None

    def apply(self, index: int, command: Command) -> Any:
        machine = self.machine_for(command.op)
        if machine is None:
            # A newer node may have proposed an op this build does not know; refusing it
            # the same way on every replica keeps them identical.
            return {"status": "error", "code": "unknown_op", "message": command.op}
        return machine.apply(index, command)

    def take_writes(self) -> list[HashWrite]:
        writes: list[HashWrite] = []
        for machine in self.machines:
            writes.extend(machine.take_writes())
        return writes

    def dump(self) -> dict[str, dict[str, str]]:
        merged: dict[str, dict[str, str]] = {}
        for machine in self.machines:
            merged.update(machine.dump())
        return merged

    def snapshot_data(self) -> bytes:
        """`dump()` as snapshot data (what `encode_snapshot_data(dump())` would be,
        without re-encoding what machines keep packed)."""
        entries: list[bytes] = []
        for machine in self.machines:
            entries.extend(packed_dump(machine))
        return join_entries(entries)

    def load(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        for machine in self.machines:
            mine = {k: v for k, v in hashes.items() if k.startswith(machine.prefix)}
            machine.load(mine)
