"""Exactly-once request ids: the dedup table and the Deduplicated wrapper."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.dedup import DEDUP_PREFIX, Deduplicated, DedupTable, _Entry, _to_json
from service.kv.machine import KvStateMachine
from service.machines import MachineRegistry
from service.statemachine import Command


def make(max_entries: int = 10) -> tuple[DedupTable, Deduplicated, MachineRegistry]:
    table = DedupTable(max_entries)
    kv = Deduplicated(KvStateMachine(), table, "kv")
    return table, kv, MachineRegistry([kv, table])


def put(value: str, rid: str | None, expected: int | None = None) -> Command:
    args: dict[str, object] = {"key": "k", "value": value}
    if expected is not None:
        args["expected_version"] = expected
    return Command("kv.put", args, rid)


def test_a_retried_command_applies_once_and_returns_the_first_result() -> None:
    _, kv, registry = make()
    first = registry.apply(5, put("a", "r1"))
    again = registry.apply(9, put("a", "r1"))
    assert first == again == {"status": "ok", "version": 5}
    assert kv.inner.get("k") == ("a", 5)  # type: ignore[attr-defined]


def test_without_request_id_every_copy_applies() -> None:
    _, kv, registry = make()
    registry.apply(5, put("a", None))
    registry.apply(6, put("a", None))
    assert kv.inner.get("k") == ("a", 6)  # type: ignore[attr-defined]


def test_argument_order_does_not_matter_but_different_arguments_are_refused() -> None:
    _, _, registry = make()
    registry.apply(1, Command("kv.put", {"key": "k", "value": "a"}, "r"))
    reordered = registry.apply(2, Command("kv.put", {"value": "a", "key": "k"}, "r"))
    assert reordered == {"status": "ok", "version": 1}
    other = registry.apply(3, put("b", "r"))
    assert other["code"] == "request_id_reused"
    assert registry.apply(4, Command("kv.delete", {"key": "k"}, "r"))["code"] == (
        "request_id_reused"
    )


def test_bad_request_ids_are_refused_without_applying() -> None:
    _, kv, registry = make()
    result = registry.apply(1, put("a", "x" * 300))
    assert result["code"] == "bad_request_id"
    assert kv.inner.get("k") is None  # type: ignore[attr-defined]


def test_table_is_bounded_and_forgets_the_oldest_deterministically() -> None:
    table, kv, registry = make(max_entries=3)
    for i in range(1, 6):
        registry.apply(i, put(f"v{i}", f"r{i}"))
    assert len(table) == 3
    assert table.lookup("kv", "r1") is None and table.lookup("kv", "r2") is None
    assert table.lookup("kv", "r5") is not None
    writes = {w.key: w for w in registry.take_writes()}
    req = writes[DEDUP_PREFIX + "kv"]
    assert set(req.fields) == {"r3", "r4", "r5"}
    # A forgotten id applies again (documented: keep retry windows short).
    registry.apply(6, put("v1", "r1"))
    assert kv.inner.get("k") == ("v1", 6)  # type: ignore[attr-defined]


def test_dump_and_load_round_trip_keeps_results_and_order() -> None:
    _table, _, registry = make(max_entries=3)
    for i in range(1, 4):
        registry.apply(i, put(f"v{i}", f"r{i}"))
    dumped = registry.dump()
    table2, _, registry2 = make(max_entries=3)
    registry2.load(dumped)
    assert registry2.dump() == dumped
    assert registry2.apply(10, put("v2", "r2")) == {"status": "ok", "version": 2}
    registry2.apply(11, put("v4", "r4"))
    assert table2.lookup("kv", "r1") is None  # the oldest by index went first


def test_the_snapshot_and_the_redis_write_carry_the_same_text() -> None:
    """Each entry is encoded once; the dump (a snapshot) reuses that text, which must be
    what Redis got when the entry was recorded, and what loading it gives back."""
    _table, _, registry = make(max_entries=10)
    for i in range(1, 4):
        registry.apply(i, put(f"v{i}", f"r{i}"))
    writes = registry.take_writes()
    written = {w.key: dict(w.fields) for w in writes if w.key.startswith(DEDUP_PREFIX)}
    dumped = {k: v for k, v in registry.dump().items() if k.startswith(DEDUP_PREFIX)}
    assert dumped == written
    record = json.loads(dumped[DEDUP_PREFIX + "kv"]["r2"])
    assert record["index"] == 2 and record["op"] == "kv.put"
    assert record["result"] == {"status": "ok", "version": 2}


def test_a_malformed_materialised_entry_stops_the_load() -> None:
    table = DedupTable()
    with pytest.raises(ValueError, match="malformed dedup entry"):
        table.load({DEDUP_PREFIX + "kv": {"r": "{not json"}})


def test_dedup_table_handles_no_ops_itself() -> None:
    table = DedupTable()
    assert not table.handles("kv.put")
    assert table.apply(1, put("a", None))["code"] == "unknown_op"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)


@given(st.integers(0, 2**63), st.text(max_size=12), st.text(max_size=16), _json_values)
def test_entry_encoding_is_the_canonical_json_record(
    index: int, op: str, digest: str, result: object
) -> None:
    """The spliced encoding must be byte-for-byte what json.dumps of the record gives,
    and decode back to the same entry."""
    entry = _Entry(index, op, digest, _to_json(result))
    record = {"index": index, "op": op, "args": digest, "result": result}
    assert entry.encode() == json.dumps(record, separators=(",", ":"), sort_keys=True)
    assert _Entry.decode(entry.encode()) == entry


def test_stored_forms_do_not_change_between_versions() -> None:
    """Digests and results are stored in Redis and in snapshots: a node upgraded in place
    must compute the same bytes, or it refuses retries of requests applied before."""
    from service.dedup import _digest, _to_json

    args = {"name": "l", "owner": "o", "ttl_ms": 5000, "data": b"\x01", "z": None, "a": [1, "é"]}
    assert _digest(args) == "add528dc79713513"
    result = {"status": "ok", "token": 7, "b": [1.5, None], "a": "é"}
    assert _to_json(result) == '{"a":"\\u00e9","b":[1.5,null],"status":"ok","token":7}'
