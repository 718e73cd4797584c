"""LockStateMachine: command parsing, result shapes, materialisation, dump/load."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from service.locks import Granted, LockStateMachine, WaitDropped
from service.statemachine import Command, StateMachine

from .driver import Driver, apply_writes


@pytest.fixture
def d() -> Driver:
    return Driver()


def test_it_is_a_state_machine():
    machine: StateMachine = LockStateMachine()
    assert machine.prefix == "dsync:lock:"


def test_it_handles_the_lock_namespace_only(d):
    assert d.m.handles("lock.acquire") and d.m.handles("lock.whatever")
    assert not d.m.handles("kv.put") and not d.m.handles("locks.acquire")


# --- result shapes ------------------------------------------------------------------


def test_acquire_results(d):
    d.now = 100
    granted = d.acquire("L", "a", ttl=50)
    assert granted == {
        "status": "granted",
        "name": "L",
        "owner": "a",
        "mode": "exclusive",
        "token": 1,
        "ttl_ms": 50,
        "expires_at_ms": 150,
    }
    assert d.acquire("L", "b") == {"status": "held", "name": "L"}
    assert d.acquire("L", "c", mode="shared", wait=True, wait_ms=20) == {
        "status": "queued",
        "name": "L",
        "owner": "c",
        "mode": "shared",
        "seq": 3,
        "position": 1,
        "wait_deadline_ms": 120,
    }
    conflict = d.acquire("L", "a", mode="shared")
    assert conflict["status"] == "error" and conflict["code"] == "mode_conflict"
    assert conflict["current_mode"] == "exclusive" and conflict["waiting"] is False


def test_deadlock_result_names_the_cycle(d):
    d.acquire("L1", "a")
    d.acquire("L2", "b")
    d.acquire("L2", "a", wait=True)
    assert d.acquire("L1", "b", wait=True) == {
        "status": "deadlock",
        "name": "L1",
        "cycle": ["b", "a"],
    }


def test_release_keepalive_expire_results(d):
    token = d.acquire("L", "a", ttl=10)["token"]
    assert d.keepalive("L", "a", token, ttl=20) == {
        "status": "ok",
        "token": token,
        "ttl_ms": 20,
        "expires_at_ms": 20,
    }
    assert d.keepalive("L", "b", token) == {"status": "not_held"}
    assert d.release("L", "a", token + 1) == {"status": "stale_token"}
    assert d.expire("L", "a", token) == {"status": "noop"}
    d.now = 20
    assert d.expire("L", "a", token) == {"status": "expired"}
    assert d.release("L", "a", token) == {"status": "not_held"}


def test_cancel_and_expire_wait_results(d):
    d.acquire("L", "a", ttl=10_000)
    seq = d.acquire("L", "b", wait=True, wait_ms=5)["seq"]
    assert d.expire_wait("L", "b", seq) == {"status": "noop"}
    d.now = 5
    assert d.expire_wait("L", "b", seq) == {"status": "expired"}
    d.acquire("L", "c", wait=True)
    assert d.cancel("L", "c") == {"status": "cancelled"}
    assert d.cancel("L", "c") == {"status": "not_waiting"}


def test_leader_change_takes_now_from_args_or_command(d):
    d.acquire("L", "a", ttl=10)
    assert d.apply("lock.leader_change", {"now_ms": 1000}) == {
        "status": "ok",
        "holds": 1,
        "waits": 0,
    }
    assert d.m.get("L").holders[0].expires_at_ms == 1010
    d.leader_change(50)
    assert d.m.get("L").holders[0].expires_at_ms == 60


def test_results_survive_msgpack_and_json_unchanged(d):
    d.acquire("L1", "a")
    d.acquire("L2", "b")
    d.acquire("L2", "a", wait=True)
    results = [
        d.acquire("L1", "b", wait=True),
        d.acquire("L1", "c", mode="shared", wait=True),
        d.acquire("L1", "a", mode="shared"),
        d.release("L1", "a", 1),
    ]
    for result in results:
        assert msgpack.unpackb(msgpack.packb(result)) == result
        assert json.loads(json.dumps(result)) == result


def test_events_report_side_effect_grants_and_dropped_waits(d):
    token = d.acquire("L", "a")["token"]
    d.acquire("L", "b", wait=True)
    d.acquire("L", "c", wait=True)
    d.cancel("L", "c")
    d.release("L", "a", token)
    events = d.m.take_events()
    assert [type(e) for e in events] == [WaitDropped, Granted]
    assert events[1].owner == "b" and events[1].token == d.index


# --- never raises on bad input ------------------------------------------------------


BAD_ARGS: list[tuple[str, Any]] = [
    ("lock.acquire", {}),
    ("lock.acquire", {"name": "L", "owner": "a"}),  # no ttl
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": True}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 0}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 10**30}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 1.5}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": "10"}),
    ("lock.acquire", {"name": "", "owner": "a", "ttl_ms": 10}),
    ("lock.acquire", {"name": "x" * 257, "owner": "a", "ttl_ms": 10}),
    ("lock.acquire", {"name": "é" * 129, "owner": "a", "ttl_ms": 10}),  # 258 bytes
    ("lock.acquire", {"name": "\udc80", "owner": "a", "ttl_ms": 10}),
    ("lock.acquire", {"name": b"L", "owner": "a", "ttl_ms": 10}),
    ("lock.acquire", {"name": "L", "owner": None, "ttl_ms": 10}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 10, "mode": "EXCLUSIVE"}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 10, "mode": ["shared"]}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 10, "wait": "yes"}),
    ("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 10, "wait_ms": -1}),
    ("lock.acquire", ["L", "a"]),
    ("lock.acquire", None),
    ("lock.acquire", "L"),
    ("lock.release", {"name": "L", "owner": "a"}),
    ("lock.release", {"name": "L", "owner": "a", "token": -1}),
    ("lock.release", {"name": "L", "owner": "a", "token": 2**64}),
    ("lock.keepalive", {"name": "L", "owner": "a", "token": 1, "ttl_ms": 0}),
    ("lock.expire", {"name": "L", "token": 1}),
    ("lock.cancel_wait", {"name": "L"}),
    ("lock.cancel_wait", {"name": "L", "owner": "a", "seq": "1"}),
    ("lock.expire_wait", {"name": "L", "owner": "a"}),
    ("lock.leader_change", {"now_ms": "soon"}),
    ("lock.nope", {}),
]


@pytest.mark.parametrize(("op", "args"), BAD_ARGS)
def test_a_bad_command_is_an_error_result_and_changes_nothing(d, op, args):
    d.acquire("L", "a")
    before = d.m.dump()
    d.m.take_writes()
    result = d.m.apply(99, Command(op, args, now_ms=1))
    assert result["status"] == "error"
    assert result["code"] in ("bad_command", "unknown_op")
    assert result["message"]
    assert d.m.dump() == before
    assert d.m.take_writes() == []


def test_a_non_integer_clock_is_an_error_result(d):
    result = d.m.apply(
        1, Command("lock.acquire", {"name": "L", "owner": "a", "ttl_ms": 1}, now_ms=1.5)
    )  # type: ignore[arg-type]
    assert result["code"] == "bad_command"


def test_an_internal_failure_becomes_an_error_result(d, monkeypatch):
    def boom(*args: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(d.m._table, "acquire", boom)
    assert d.acquire("L", "a")["code"] == "internal"


def test_names_and_owners_at_the_byte_limit_are_fine(d):
    name = "é" * 128  # 256 bytes
    assert d.acquire(name, "o" * 256)["status"] == "granted"


# --- materialisation -----------------------------------------------------------------


def test_a_held_lock_reads_clearly_in_redis(d):
    d.now = 1000
    d.acquire("mylock", "alice", ttl=30_000)
    d.acquire("mylock", "bob", mode="shared", ttl=5_000, wait=True, wait_ms=2_000)
    store: dict[str, dict[str, str]] = {}
    apply_writes(store, d.m.take_writes())
    assert store == {
        "dsync:lock:mylock": {
            "mode": "exclusive",
            "last_token": "1",
            "holder:alice": "1|exclusive|30000|31000",
            "waiter:2": "bob|shared|5000|2000|3000",
        }
    }


def test_a_free_lock_keeps_only_its_last_token(d):
    token = d.acquire("L", "a")["token"]
    d.release("L", "a", token)
    store: dict[str, dict[str, str]] = {}
    apply_writes(store, d.m.take_writes())
    assert store == {"dsync:lock:L": {"mode": "free", "last_token": "1", "freed_at": "2"}}


def test_a_forgotten_lock_drops_its_key():
    d = Driver(LockStateMachine(max_tombstones=0))
    store: dict[str, dict[str, str]] = {}
    token = d.acquire("L", "a")["token"]
    apply_writes(store, d.m.take_writes())
    d.release("L", "a", token)
    writes = d.m.take_writes()
    assert [(w.key, dict(w.fields), w.drop) for w in writes] == [("dsync:lock:L", {}, True)]
    apply_writes(store, writes)
    assert store == {}


def test_only_changed_locks_are_written_once(d):
    d.acquire("A", "a")
    d.acquire("B", "a")
    d.m.take_writes()
    d.acquire("A", "b")  # try-lock lost: nothing changed
    assert d.m.take_writes() == []
    d.acquire("A", "b", wait=True)
    assert [w.key for w in d.m.take_writes()] == ["dsync:lock:A"]
    assert d.m.take_writes() == []


def test_a_lock_with_a_long_queue_is_written_field_by_field(d):
    store: dict[str, dict[str, str]] = {}
    token = d.acquire("L", "holder", ttl=60_000)["token"]
    for i in range(1_000):
        d.acquire("L", f"w{i}", wait=True, wait_ms=60_000)
    apply_writes(store, d.m.take_writes())
    d.release("L", "holder", token)  # w0 is granted: two holds and one wait change
    (write,) = d.m.take_writes()
    assert not write.drop and sorted(write.fields) == ["holder:w0", "last_token", "mode"]
    assert write.deleted == ("freed_at", "holder:holder", "waiter:2")
    apply_writes(store, [write])
    assert store == d.m.dump()
    d.leader_change(5)  # every deadline moves, and only the lease epoch is written
    (write,) = d.m.take_writes()
    assert write.key == "dsync:lock:" and write.fields == {"epoch": "1", "now_ms": "5"}
    apply_writes(store, [write])
    assert store == d.m.dump()
    view = d.m.get("L")
    assert view is not None and view.holders[0].expires_at_ms == 5 + view.holders[0].ttl_ms
    assert {w.deadline_ms for w in view.waiters} == {5 + 60_000}


def test_a_leader_change_over_many_locks_writes_one_hash_and_reloads_the_same() -> None:
    """The lease reset is an epoch, not a rewrite of every lock: with 60,000 held locks
    the rewrite took each replica seconds and kept deposing leaders."""
    machine = LockStateMachine()
    index = 0
    for i in range(3_000):
        index += 1
        machine.apply(index, Command("lock.acquire", {"name": f"L{i}", "owner": "o",
                                                      "ttl_ms": 1_000 + i}, now_ms=10))
    store: dict[str, dict[str, str]] = {}
    apply_writes(store, machine.take_writes())
    before = {k: dict(v) for k, v in store.items()}
    index += 1
    result = machine.apply(index, Command("lock.leader_change", {}, now_ms=500))
    assert result == {"status": "ok", "holds": 3_000, "waits": 0}
    writes = machine.take_writes()
    assert [w.key for w in writes] == ["dsync:lock:"]
    apply_writes(store, writes)
    assert {k: v for k, v in store.items() if k != "dsync:lock:"} == before
    reloaded = LockStateMachine()
    reloaded.load(store)
    assert reloaded.dump() == machine.dump() == store
    for m in (machine, reloaded):
        assert [(d.name, d.deadline_ms) for d in m.expired(500 + 1_001)] == [
            ("L0", 1_500), ("L1", 1_501)
        ]
        view = m.get("L7")
        assert view is not None and view.holders[0].expires_at_ms == 500 + 1_007
    index += 1
    kept = machine.apply(index, Command("lock.keepalive", {"name": "L7", "owner": "o",
                                                           "token": 8}, now_ms=600))
    assert kept["status"] == "ok" and kept["expires_at_ms"] == 600 + 1_007
    (write,) = machine.take_writes()
    assert write.fields["holder:o"] == "8|exclusive|1007|1607@1"


def test_awkward_owner_names_round_trip(d):
    owners = ["a|b", "c:d", "holder:x", "waiter:1", "sp ace", "ünï|cødé|"]
    d.acquire("L", "first")
    for owner in owners:
        d.acquire("L", owner, mode="shared", wait=True)
    for owner in owners[:2]:
        d.acquire("M", owner, mode="shared")
    fresh = LockStateMachine()
    fresh.load(d.m.dump())
    assert fresh.dump() == d.m.dump()
    assert [w.owner for w in fresh.get("L").waiters] == owners
    assert [h.owner for h in fresh.get("M").holders] == owners[:2]


def test_the_writes_rebuild_exactly_the_dump(d):
    store: dict[str, dict[str, str]] = {}
    t1 = d.acquire("A", "a", ttl=10)["token"]
    d.acquire("A", "b", wait=True)
    d.acquire("B", "b", mode="shared")
    apply_writes(store, d.m.take_writes())
    d.release("A", "a", t1)
    d.now = 50
    d.leader_change(3)
    apply_writes(store, d.m.take_writes())
    assert store == d.m.dump()


# --- dump / load ---------------------------------------------------------------------


def test_load_of_a_dump_is_the_same_state(d):
    d.now = 10
    d.acquire("A", "a", ttl=10)
    d.acquire("A", "b", mode="shared", wait=True, wait_ms=7)
    d.acquire("A", "c", mode="shared", wait=True)
    d.acquire("B", "c")
    d.acquire("B", "a", wait=True)
    t = d.acquire("C", "x")["token"]
    d.release("C", "x", t)
    fresh = LockStateMachine()
    fresh.load(d.m.dump())
    assert fresh.dump() == d.m.dump()
    for name in ("A", "B", "C", "D"):
        assert fresh.get(name) == d.m.get(name)
    assert fresh.expired(100) == d.m.expired(100)
    assert fresh.expired_waits(100) == d.m.expired_waits(100)
    assert fresh.wait_for_graph() == d.m.wait_for_graph()
    assert fresh.take_writes() == [] and fresh.take_events() == []


def test_load_replaces_everything_and_ignores_other_prefixes(d):
    d.acquire("A", "a")
    d.m.load({"dsync:kv:x": {"v": "1"}})
    assert d.m.dump() == {}


@pytest.mark.parametrize(
    "fields",
    [
        {"mode": "exclusive"},  # no last_token
        {"mode": "exclusive", "last_token": "x"},
        {"mode": "exclusive", "last_token": "1", "holder:a": "1|exclusive|10"},
        {"mode": "exclusive", "last_token": "1", "holder:a": "1|both|10|10"},
        {"mode": "shared", "last_token": "1", "holder:a": "1|exclusive|10|10"},
        {"mode": "free", "last_token": "1"},  # no freed_at
        {"mode": "exclusive", "last_token": "1", "holder:a": "1|exclusive|10|10", "junk": "1"},
        {  # two exclusive holders
            "mode": "exclusive",
            "last_token": "2",
            "holder:a": "1|exclusive|10|10",
            "holder:b": "2|exclusive|10|10",
        },
        {  # a grantable head waiter
            "mode": "shared",
            "last_token": "1",
            "holder:a": "1|shared|10|10",
            "waiter:2": "b|shared|10|10|10",
        },
    ],
)
def test_load_refuses_a_malformed_or_inconsistent_hash(fields):
    with pytest.raises(ValueError, match="'L'"):
        LockStateMachine().load({"dsync:lock:L": fields})


def test_load_forgets_free_locks_beyond_a_smaller_bound():
    d = Driver()
    for name in "ABC":
        d.release(name, "a", d.acquire(name, "a")["token"])
    small = LockStateMachine(max_tombstones=1)
    small.load(d.m.dump())
    assert sorted(small.dump()) == ["dsync:lock:C"]
    assert sorted(w.key for w in small.take_writes()) == ["dsync:lock:A", "dsync:lock:B"]


def test_a_store_written_before_lease_epochs_loads_as_epoch_0() -> None:
    """Version 1 stores: no `@epoch` in holds or waits, no `dsync:lock:` hash."""
    old = {
        "dsync:lock:L": {
            "mode": "exclusive",
            "last_token": "7",
            "holder:a": "7|exclusive|30000|40000",
            "waiter:9": "b|exclusive|30000|5000|15000",
        }
    }
    machine = LockStateMachine()
    machine.load(old)
    assert machine.dump() == old
    view = machine.get("L")
    assert view is not None
    assert (view.holders[0].expires_at_ms, view.waiters[0].deadline_ms) == (40_000, 15_000)
    assert [d.name for d in machine.expired(40_000)] == ["L"]
    machine.apply(10, Command("lock.leader_change", {}, now_ms=100))
    view = machine.get("L")
    assert view is not None
    assert (view.holders[0].expires_at_ms, view.waiters[0].deadline_ms) == (30_100, 5_100)
    assert machine.expired(40_000)[0].deadline_ms == 30_100
    dumped = machine.dump()
    assert dumped["dsync:lock:"] == {"epoch": "1", "now_ms": "100"}
    assert dumped["dsync:lock:L"] == old["dsync:lock:L"], "the lock itself is not rewritten"
