"""Snapshot data from packed entries: the same bytes msgpack makes of the whole map,
from every machine of the registry, reusing the lock machine's entries for idle locks."""

from __future__ import annotations

import msgpack
import pytest

from service.dedup import Deduplicated, DedupTable
from service.kv.machine import KvStateMachine
from service.locks import LockStateMachine
from service.machines import MachineRegistry
from service.raft.runner import decode_snapshot_data, encode_snapshot_data
from service.snapshot_entries import join_entries, pack_entry
from service.statemachine import Command


@pytest.mark.parametrize("count", [0, 1, 15, 16, 200, 65_535, 65_536])
def test_joined_entries_are_the_bytes_of_the_packed_map(count: int) -> None:
    """Every map header size: fixmap up to 15 entries, map16 up to 65,535, then map32."""
    hashes = {f"k{i}": {"f": str(i), "g": "é" * (i % 3)} for i in range(count)}
    joined = join_entries([pack_entry(k, v) for k, v in hashes.items()])
    assert joined == msgpack.packb(hashes, use_bin_type=True)
    assert decode_snapshot_data(joined) == hashes


def _acquire(name: str, owner: str, now: int = 1, ttl_ms: int = 60_000) -> Command:
    return Command(
        "lock.acquire", {"name": name, "owner": owner, "ttl_ms": ttl_ms}, now_ms=now
    )


def test_the_registry_packs_what_encoding_its_dump_would() -> None:
    locks = Deduplicated(LockStateMachine(), DedupTable(), "lock")
    kv = KvStateMachine()
    registry = MachineRegistry([locks, kv, locks.table])
    index = 0
    for i in range(40):
        index += 1
        command = _acquire(f"L{i % 7}", f"o{i}")
        registry.apply(index, Command(command.op, command.args, f"r{i}", now_ms=i))
        index += 1
        registry.apply(index, Command("kv.put", {"key": f"k{i % 5}", "value": str(i)}, now_ms=i))
        # sometimes before the writes are taken (changes unflushed), sometimes after
        if i % 3:
            registry.take_writes()
        assert registry.snapshot_data() == encode_snapshot_data(registry.dump())
    for prefix in registry.prefixes:
        assert any(k.startswith(prefix) for k in registry.dump()), prefix


def test_an_idle_lock_is_packed_once_and_a_changed_one_again() -> None:
    machine = LockStateMachine()
    machine.apply(1, _acquire("idle", "a"))
    machine.apply(2, _acquire("busy", "b"))
    machine.take_writes()
    first = dict(zip(sorted(["busy", "idle"]), machine.packed_dump(), strict=True))
    result = machine.apply(3, Command("lock.keepalive", {"name": "busy", "owner": "b",
                                                         "token": 2}, now_ms=5))
    assert result["status"] == "ok"
    unflushed = dict(zip(["busy", "idle"], machine.packed_dump(), strict=True))
    assert unflushed["idle"] is first["idle"], "the idle lock's entry was reused"
    assert unflushed["busy"] != first["busy"], "a change not yet taken is packed afresh"
    machine.take_writes()
    after = dict(zip(["busy", "idle"], machine.packed_dump(), strict=True))
    assert after["busy"] == unflushed["busy"] and after["idle"] is first["idle"]
    assert join_entries(machine.packed_dump()) == encode_snapshot_data(machine.dump())


def test_a_load_drops_the_packed_entries_of_the_state_it_replaces() -> None:
    machine = LockStateMachine()
    machine.apply(1, _acquire("L", "a"))
    machine.take_writes()
    before = machine.packed_dump()
    other = LockStateMachine()
    other.apply(1, _acquire("L", "z", ttl_ms=5_000))
    other.take_writes()
    machine.load(other.dump())
    assert machine.packed_dump() != before
    assert join_entries(machine.packed_dump()) == encode_snapshot_data(other.dump())
