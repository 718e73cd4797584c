"""The Raft record of which caches ever started (service/cache/starts.py)."""

from __future__ import annotations

from service.cache.starts import STARTED, CacheStartsMachine
from service.statemachine import Command


def test_the_first_start_is_new_and_every_later_one_is_not() -> None:
    machine = CacheStartsMachine()
    assert machine.apply(5, Command(STARTED, {"node": "n1"})) == {
        "status": "ok", "before": False, "index": 5,
    }  # fmt: skip
    assert machine.apply(9, Command(STARTED, {"node": "n1"}))["before"] is True
    assert machine.apply(9, Command(STARTED, {"node": "n2"}))["before"] is False
    assert machine.started("n1") and machine.started("n2") and not machine.started("n3")


def test_it_survives_a_restart_and_a_snapshot() -> None:
    machine = CacheStartsMachine()
    machine.apply(3, Command(STARTED, {"node": "n1"}))
    writes = machine.take_writes()
    assert [(w.key, dict(w.fields)) for w in writes] == [("dsync:cachestart:n1", {"index": "3"})]
    assert machine.take_writes() == []
    for hashes in ({w.key: w.fields for w in writes}, machine.dump()):
        reloaded = CacheStartsMachine()
        reloaded.load({**hashes, "dsync:other:x": {"index": "1"}})
        assert reloaded.apply(8, Command(STARTED, {"node": "n1"}))["before"] is True
        assert not reloaded.started("x")


def test_a_command_without_a_node_is_refused() -> None:
    machine = CacheStartsMachine()
    assert machine.apply(1, Command(STARTED, {}))["status"] == "error"
    assert machine.apply(1, Command(STARTED, {"node": ""}))["status"] == "error"
    assert machine.dump() == {} and machine.handles(STARTED) and not machine.handles("kv.put")
