"""One contract for every storage implementation: in-memory, fakeredis and a real
redis-server. Each test ends by reopening the store where that matters, so what it checks
is what a restarted node would load, not what an object remembers."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import pytest
from redis.asyncio import Redis

from service.raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from service.storage import keys
from service.storage.protocols import HashWrite, RaftStorage
from service.storage.redis_store import RedisRaftStorage, RedisStateStore
from tests.helpers.redis_server import running_redis, wait_gone
from tests.helpers.redis_spy import redis_calls

from .conftest import Backend


def log(*terms: int, start: int = 1) -> list[Entry]:
    """Entries start, start+1, ... with the given terms and data naming their index."""
    return [
        Entry(start + i, t, EntryKind.NORMAL, f"cmd{start + i}".encode())
        for i, t in enumerate(terms)
    ]


def snap(index: int, term: int, voters: tuple[str, ...] = ("n1", "n2", "n3")) -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, voters), b"\x00state:" + bytes([index % 256]))


async def whole_log(raft: RaftStorage) -> list[Entry]:
    return await raft.entries(await raft.first_index(), await raft.last_index() + 1)


async def bounds(raft: RaftStorage) -> tuple[int, int]:
    return await raft.first_index(), await raft.last_index()


# --- Raft storage -----------------------------------------------------------------------


async def test_empty_store(backend: Backend) -> None:
    raft, state = backend.raft, backend.state
    assert await raft.load_hard_state() == HardState(0, None)
    assert await bounds(raft) == (1, 0)
    assert await raft.entries(1, 100) == []
    assert await raft.load_snapshot() is None
    assert await state.load_applied_index() == 0
    assert await state.load_prefix("dsync:lock:") == {}


async def test_hard_state_round_trip(backend: Backend) -> None:
    await backend.raft.save_hard_state(HardState(3, "n2"))
    await backend.reopen()
    assert await backend.raft.load_hard_state() == HardState(3, "n2")

    # A new term without a vote must clear the old vote, not keep it.
    await backend.raft.save_hard_state(HardState(4, None))
    await backend.reopen()
    assert await backend.raft.load_hard_state() == HardState(4, None)


async def test_append_and_range_reads(backend: Backend) -> None:
    entries = [
        Entry(1, 1, EntryKind.NOOP, b""),
        Entry(2, 1, EntryKind.NORMAL, b"a:b:c"),  # the separator inside data
        Entry(3, 2, EntryKind.CONFIG, b"n1,n2"),
        Entry(4, 2, EntryKind.NORMAL, bytes(range(256))),
    ]
    await backend.raft.append(entries)
    await backend.reopen()
    raft = backend.raft
    assert await bounds(raft) == (1, 4)
    assert await raft.entries(1, 5) == entries
    assert await raft.entries(2, 4) == entries[1:3]
    assert await raft.entries(0, 1000) == entries
    assert await raft.entries(3, 3) == []
    assert await raft.entries(4, 2) == []
    assert await raft.entries(5, 10) == []


async def test_identical_entries_at_different_indexes_are_all_kept(backend: Backend) -> None:
    same = [Entry(i, 1, EntryKind.NORMAL, b"same command") for i in (1, 2, 3)]
    await backend.raft.append(same)
    await backend.reopen()
    assert await backend.raft.entries(1, 4) == same


async def test_append_extends_the_log(backend: Backend) -> None:
    await backend.raft.append(log(1, 1))
    await backend.raft.append(log(1, 2, start=3))
    await backend.reopen()
    assert await whole_log(backend.raft) == log(1, 1, 1, 2)


async def test_append_replaces_a_conflicting_suffix(backend: Backend) -> None:
    await backend.raft.append(log(1, 1, 1, 1, 1))
    # A follower learns entry 3 is from another term: 3..5 go, even though the new
    # batch is shorter than what it replaces.
    replacement = [Entry(3, 2, EntryKind.NORMAL, b"new3")]
    await backend.raft.append(replacement)
    await backend.reopen()
    assert await bounds(backend.raft) == (1, 3)
    assert await whole_log(backend.raft) == log(1, 1) + replacement


async def test_append_after_appends_replaces_a_conflicting_suffix(backend: Backend) -> None:
    # The same, after appends that each extended the log (the Redis store sends those as
    # a lone ZADD and must still drop the suffix when a batch starts inside the log).
    await backend.raft.append(log(1, 1))
    await backend.raft.append(log(1, 1, 1, start=3))
    replacement = [Entry(4, 2, EntryKind.NORMAL, b"new4")]
    await backend.raft.append(replacement)
    await backend.raft.append(log(2, start=5))
    await backend.reopen()
    assert await whole_log(backend.raft) == log(1, 1, 1) + replacement + log(2, start=5)


async def test_an_append_extending_the_log_is_one_command(redis_backend: Backend) -> None:
    redis = redis_backend.redis
    assert redis is not None
    await redis_backend.raft.append(log(1, 1))
    with redis_calls(redis) as calls:
        await redis_backend.raft.append(log(1, 1, start=3))
    assert calls.commands == ["ZADD"] and calls.pipelines == []


async def test_after_a_failed_append_the_next_one_drops_what_it_may_have_left(
    redis_backend: Backend,
) -> None:
    """An append whose reply was lost may have been applied: the store no longer knows
    where the log ends, so the next append drops any suffix first."""
    redis = redis_backend.redis
    assert redis is not None
    await redis_backend.raft.append(log(1, 1))
    real_zadd = redis.zadd

    async def applied_then_lost(*args, **kwargs):  # type: ignore[no-untyped-def]
        await real_zadd(*args, **kwargs)
        raise ConnectionError("the reply was lost")

    redis.zadd = applied_then_lost  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await redis_backend.raft.append(log(1, start=3))
    redis.zadd = real_zadd  # type: ignore[method-assign]
    replacement = [Entry(3, 2, EntryKind.NORMAL, b"other3")]  # a new leader's entry 3
    await redis_backend.raft.append(replacement)
    await redis_backend.reopen()
    assert await whole_log(redis_backend.raft) == log(1, 1) + replacement


async def test_append_refuses_non_consecutive_entries(backend: Backend) -> None:
    await backend.raft.append(log(1, 1))
    with pytest.raises(ValueError, match="consecutive"):
        await backend.raft.append([Entry(3, 1), Entry(5, 1)])
    with pytest.raises(ValueError, match="start at 1"):
        await backend.raft.append([Entry(0, 1)])
    assert await whole_log(backend.raft) == log(1, 1)


async def test_compaction_drops_a_prefix(backend: Backend) -> None:
    await backend.raft.append(log(*[1] * 10))
    await backend.raft.compact(4)
    await backend.reopen()
    assert await bounds(backend.raft) == (5, 10)
    assert await backend.raft.entries(1, 11) == log(*[1] * 6, start=5)
    await backend.raft.compact(2)  # already gone: nothing changes
    assert await bounds(backend.raft) == (5, 10)


async def test_snapshot_round_trip(backend: Backend) -> None:
    snapshot = Snapshot(SnapshotMeta(7, 3, ("a", "b")), bytes(range(256)) * 4)
    await backend.raft.save_snapshot(snapshot)
    await backend.reopen()
    assert await backend.raft.load_snapshot() == snapshot
    assert await bounds(backend.raft) == (8, 7)

    empty = Snapshot(SnapshotMeta(9, 3, ()), b"")
    await backend.raft.save_snapshot(empty)
    await backend.reopen()
    assert await backend.raft.load_snapshot() == empty


async def test_snapshot_matching_the_log_keeps_the_entries_after_it(backend: Backend) -> None:
    await backend.raft.append(log(1, 1, 2, 2, 2, 3))
    await backend.raft.save_snapshot(snap(4, 2))
    await backend.reopen()
    assert await bounds(backend.raft) == (5, 6)
    assert await whole_log(backend.raft) == log(2, 3, start=5)


async def test_snapshot_beyond_the_log_empties_it(backend: Backend) -> None:
    await backend.raft.append(log(1, 1, 1))
    await backend.raft.save_snapshot(snap(20, 4))
    await backend.reopen()
    assert await bounds(backend.raft) == (21, 20)
    assert await backend.raft.entries(1, 100) == []
    await backend.raft.append(log(4, 5, start=21))
    assert await whole_log(backend.raft) == log(4, 5, start=21)


async def test_snapshot_contradicting_the_log_drops_all_of_it(backend: Backend) -> None:
    # Entry 3 has term 1 here but term 2 in the snapshot: entries 4 and 5 belong to a
    # history the leader does not have and must not survive.
    await backend.raft.append(log(1, 1, 1, 1, 1))
    await backend.raft.save_snapshot(snap(3, 2))
    await backend.reopen()
    assert await bounds(backend.raft) == (4, 3)
    assert await backend.raft.entries(1, 100) == []


async def test_snapshot_equal_to_the_stored_one_keeps_the_log(backend: Backend) -> None:
    await backend.raft.append(log(1, 1, 1, 1))
    await backend.raft.save_snapshot(snap(2, 1))
    await backend.raft.save_snapshot(snap(2, 1))
    assert await whole_log(backend.raft) == log(1, 1, start=3)


async def test_older_snapshot_is_refused_and_changes_nothing(backend: Backend) -> None:
    await backend.raft.append(log(1, 1, 1, 1, 1, 1))
    await backend.raft.save_snapshot(snap(4, 1))
    with pytest.raises(ValueError, match="older"):
        await backend.raft.save_snapshot(snap(2, 1))
    await backend.reopen()
    assert await backend.raft.load_snapshot() == snap(4, 1)
    assert await whole_log(backend.raft) == log(1, 1, start=5)


async def test_compact_after_snapshot(backend: Backend) -> None:
    await backend.raft.append(log(*[1] * 8))
    await backend.raft.save_snapshot(snap(8, 1))
    await backend.raft.compact(8)
    await backend.reopen()
    assert await bounds(backend.raft) == (9, 8)


BASE_LOG = log(1, 1, 1)
BASE_HARD = HardState(1, "n1")


@pytest.mark.parametrize(
    ("with_hard", "with_entries", "with_snapshot"),
    list(itertools.product([False, True], repeat=3)),
)
async def test_persist_every_combination(
    backend: Backend, with_hard: bool, with_entries: bool, with_snapshot: bool
) -> None:
    await backend.raft.persist(BASE_HARD, BASE_LOG, None)
    hard = HardState(2, "n3") if with_hard else None
    # A snapshot that agrees with entry 2, so entry 3 survives unless replaced.
    snapshot = snap(2, 1) if with_snapshot else None
    new_entries = [Entry(3, 2, EntryKind.NORMAL, b"x"), Entry(4, 2, EntryKind.NOOP, b"")]
    entries = new_entries if with_entries else []

    await backend.raft.persist(hard, entries, snapshot)
    await backend.reopen()

    raft = backend.raft
    assert await raft.load_hard_state() == (hard or BASE_HARD)
    assert await raft.load_snapshot() == snapshot
    expected = BASE_LOG[:2] + new_entries if with_entries else BASE_LOG
    if with_snapshot:
        expected = [e for e in expected if e.index > 2]
    assert await whole_log(raft) == expected
    assert await bounds(raft) == (expected[0].index, expected[-1].index)


async def test_persist_installs_a_snapshot_then_entries_then_hard_state(backend: Backend) -> None:
    # A follower far behind gets InstallSnapshot and the next entries in one batch.
    await backend.raft.persist(HardState(1, "n1"), log(1, 1, 1, 1, 1), None)
    await backend.raft.persist(HardState(3, None), log(3, 3, start=9), snap(8, 2))
    await backend.reopen()
    assert await backend.raft.load_hard_state() == HardState(3, None)
    assert await backend.raft.load_snapshot() == snap(8, 2)
    assert await whole_log(backend.raft) == log(3, 3, start=9)
    assert await bounds(backend.raft) == (9, 10)


async def test_refused_persist_writes_nothing(backend: Backend) -> None:
    await backend.raft.persist(BASE_HARD, BASE_LOG, None)
    with pytest.raises(ValueError, match="covered by the snapshot"):
        await backend.raft.persist(HardState(5, "n2"), log(2, start=3), snap(4, 2))
    with pytest.raises(ValueError, match="consecutive"):
        await backend.raft.persist(HardState(5, "n2"), [Entry(4, 2), Entry(6, 2)], None)
    await backend.reopen()
    assert await backend.raft.load_hard_state() == BASE_HARD
    assert await backend.raft.load_snapshot() is None
    assert await whole_log(backend.raft) == BASE_LOG


async def test_empty_persist_changes_nothing(backend: Backend) -> None:
    await backend.raft.persist(BASE_HARD, BASE_LOG, None)
    await backend.raft.persist(None, [], None)
    assert await backend.raft.load_hard_state() == BASE_HARD
    assert await whole_log(backend.raft) == BASE_LOG


# --- applied state ----------------------------------------------------------------------


async def test_apply_writes_hashes_and_applied_index(backend: Backend) -> None:
    state = backend.state
    await state.apply(
        [
            HashWrite("dsync:lock:a", {"owner": "alice", "token": "1"}),
            HashWrite("dsync:lock:b", {"owner": "böb ✓", "token": "2"}),
            HashWrite("dsync:kv:x", {"value": "1"}),
        ],
        applied_index=5,
    )
    await state.apply(
        [
            HashWrite("dsync:lock:a", {"token": "3"}, deleted=("owner",)),
            HashWrite("dsync:lock:b", {"mode": "shared"}, drop=True),
        ],
        applied_index=6,
    )
    await backend.reopen()
    state = backend.state
    assert await state.load_applied_index() == 6
    assert await state.load_prefix("dsync:lock:") == {
        "dsync:lock:a": {"token": "3"},
        "dsync:lock:b": {"mode": "shared"},
    }
    assert await state.load_prefix("dsync:kv:") == {"dsync:kv:x": {"value": "1"}}


async def test_a_hash_with_no_fields_left_is_gone(backend: Backend) -> None:
    await backend.state.apply([HashWrite("dsync:lock:a", {"owner": "x"})], 1)
    await backend.state.apply([HashWrite("dsync:lock:a", {}, deleted=("owner",))], 2)
    await backend.state.apply([HashWrite("dsync:lock:b", {"owner": "y"})], 3)
    await backend.state.apply([HashWrite("dsync:lock:b", {}, drop=True)], 4)
    await backend.reopen()
    assert await backend.state.load_prefix("dsync:lock:") == {}
    assert await backend.state.load_applied_index() == 4


async def test_load_prefix_matches_the_prefix_exactly(backend: Backend) -> None:
    await backend.state.apply(
        [
            HashWrite("dsync:lock:a", {"f": "1"}),
            HashWrite("dsync:locks:b", {"f": "2"}),
            HashWrite("dsync:lock:[x]*?", {"f": "3"}),  # glob characters in a key
        ],
        1,
    )
    assert await backend.state.load_prefix("dsync:lock:") == {
        "dsync:lock:a": {"f": "1"},
        "dsync:lock:[x]*?": {"f": "3"},
    }
    assert await backend.state.load_prefix("dsync:lock:[x]") == {"dsync:lock:[x]*?": {"f": "3"}}


async def test_many_hashes_are_all_loaded(backend: Backend) -> None:
    writes = [HashWrite(f"dsync:kv:{i}", {"v": str(i)}) for i in range(2500)]
    await backend.state.apply(writes, 1)
    loaded = await backend.state.load_prefix("dsync:kv:")
    assert loaded == {f"dsync:kv:{i}": {"v": str(i)} for i in range(2500)}


async def test_replace_all_swaps_every_listed_prefix_at_once(backend: Backend) -> None:
    await backend.state.apply(
        [
            HashWrite("dsync:lock:old", {"f": "1"}),
            HashWrite("dsync:kv:old", {"f": "2"}),
            HashWrite("dsync:cache:kept", {"f": "3"}),
        ],
        3,
    )
    await backend.state.replace_all(
        ["dsync:lock:", "dsync:kv:"],
        {"dsync:lock:new": {"f": "4"}, "dsync:kv:new": {"f": "5"}, "dsync:kv:empty": {}},
        applied_index=40,
    )
    await backend.reopen()
    state = backend.state
    assert await state.load_applied_index() == 40
    assert await state.load_prefix("dsync:lock:") == {"dsync:lock:new": {"f": "4"}}
    assert await state.load_prefix("dsync:kv:") == {"dsync:kv:new": {"f": "5"}}
    assert await state.load_prefix("dsync:cache:") == {"dsync:cache:kept": {"f": "3"}}


@pytest.mark.parametrize(
    "bad_key", ["lock:a", "dsync:raft:log", "dsync:raft:hardstate", "dsync:state:applied_index"]
)
async def test_state_writes_outside_the_state_namespace_are_refused(
    backend: Backend, bad_key: str
) -> None:
    await backend.raft.save_hard_state(BASE_HARD)
    with pytest.raises(ValueError):
        await backend.state.apply(
            [HashWrite("dsync:lock:a", {"f": "1"}), HashWrite(bad_key, {})], 9
        )
    with pytest.raises(ValueError):
        await backend.state.replace_all(["dsync:lock:"], {bad_key: {"f": "1"}}, 9)
    assert await backend.state.load_applied_index() == 0
    assert await backend.state.load_prefix("dsync:lock:") == {}
    assert await backend.raft.load_hard_state() == BASE_HARD


@pytest.mark.parametrize(
    "bad_prefix", ["dsync:", "dsync:raft:", "dsync:r", "lock:", "dsync:state:"]
)
async def test_prefixes_reaching_raft_state_are_refused(backend: Backend, bad_prefix: str) -> None:
    await backend.raft.save_hard_state(BASE_HARD)
    with pytest.raises(ValueError):
        await backend.state.replace_all([bad_prefix], {}, 1)
    with pytest.raises(ValueError):
        await backend.state.load_prefix(bad_prefix)
    assert await backend.raft.load_hard_state() == BASE_HARD


async def test_replace_all_refuses_a_hash_outside_its_prefixes(backend: Backend) -> None:
    with pytest.raises(ValueError, match="not under"):
        await backend.state.replace_all(["dsync:lock:"], {"dsync:kv:x": {"f": "1"}}, 1)


# --- Redis only -------------------------------------------------------------------------


async def test_layout_is_what_keys_py_documents(redis_backend: Backend) -> None:
    await redis_backend.raft.persist(
        HardState(7, "n2"), [Entry(5, 7, EntryKind.NORMAL, b"put")], snap(4, 6, ("n1", "n2"))
    )
    await redis_backend.state.apply([HashWrite("dsync:lock:a", {"owner": "x"})], 5)
    r = redis_backend.redis
    assert r is not None
    assert await r.type(keys.LOG) == b"zset"
    assert await r.zrangebyscore(keys.LOG, 5, 5, withscores=True) == [(b"5:7:normal:put", 5.0)]
    assert await r.hgetall(keys.HARD_STATE) == {b"term": b"7", b"vote": b"n2"}
    assert await r.hmget(keys.SNAPSHOT, ["index", "term", "voters"]) == [b"4", b"6", b"n1,n2"]
    assert await r.get(keys.APPLIED_INDEX) == b"5"
    assert await r.hgetall("dsync:lock:a") == {b"owner": b"x"}


async def test_state_ignores_non_hash_keys_under_its_prefix(redis_backend: Backend) -> None:
    r = redis_backend.redis
    assert r is not None
    await r.xadd("dsync:queue:q1:p0", {"m": "1"})
    await redis_backend.state.apply([HashWrite("dsync:queue:q1:meta", {"p": "1"})], 1)
    assert await redis_backend.state.load_prefix("dsync:queue:") == {
        "dsync:queue:q1:meta": {"p": "1"}
    }
    await redis_backend.state.replace_all(["dsync:queue:"], {}, 2)
    assert await r.xlen("dsync:queue:q1:p0") == 1


def test_a_decoding_client_is_refused() -> None:
    client = Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisRaftStorage(client)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStateStore(client)


async def test_acknowledged_writes_survive_kill_9_of_redis(tmp_path: Path) -> None:
    async with running_redis(tmp_path) as server:
        client = Redis.from_url(server.url)
        raft, state = RedisRaftStorage(client), RedisStateStore(client)
        await raft.persist(HardState(2, "n1"), log(1, 2, 2), None)
        await raft.persist(HardState(3, None), log(3, start=4), snap(2, 2))
        await state.apply([HashWrite("dsync:lock:a", {"owner": "alice"})], 2)
        await client.aclose()

        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        await server.start()  # same data dir and port, from the AOF alone
        assert server.pid != pid

        client = Redis.from_url(server.url)
        raft, state = RedisRaftStorage(client), RedisStateStore(client)
        assert await raft.load_hard_state() == HardState(3, None)
        assert await raft.load_snapshot() == snap(2, 2)
        assert await whole_log(raft) == [*log(2, start=3), *log(3, start=4)]
        assert await state.load_applied_index() == 2
        assert await state.load_prefix("dsync:lock:") == {"dsync:lock:a": {"owner": "alice"}}
        await client.aclose()
