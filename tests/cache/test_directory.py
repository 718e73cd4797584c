"""Directory: one test per (directory state, message) transition of the home's side of
MESI, lease expiry, FIFO serialisation, stale-message handling and the hash mirror."""

from __future__ import annotations

import json

import pytest

from service.cache import (
    Data,
    Directory,
    DirEntry,
    DirState,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    Inv,
    InvAck,
    PersistEntry,
    PutAck,
    PutE,
    PutM,
    PutS,
    Send,
    State,
    Unblock,
)

from .util import messages, persisted

HOME = "h"
LEASE = 100
K = "k"


def new_dir() -> Directory:
    return Directory(HOME, lease_ms=LEASE)


def finish(d: Directory, node: str, now: int = 0) -> list:
    """The requester's Unblock for the running transaction."""
    txn = d.entry(K).txn
    return d.step(Unblock(K, node, txn), now)


def shared_by(*nodes: str, now: int = 0) -> Directory:
    """A directory whose key is S at `nodes` (granted in txns 1, 2, ...), leases from `now`."""
    d = new_dir()
    sharers = {node: i + 1 for i, node in enumerate(nodes)}
    d.restore(K, DirEntry(K, DirState.S, sharers=sharers, txn=len(nodes)).to_hash(), now)
    return d


def owned_by(node: str, version: int = 0, data: str | None = None) -> Directory:
    d = new_dir()
    if version:
        d.restore(K, DirEntry(K, version=version, data=data, txn=0).to_hash(), 0)
    d.step(GetM(K, node), 0)
    finish(d, node)
    assert d.entry(K).owner == node
    return d


# ---- GetS --------------------------------------------------------------------------------


def test_gets_on_i_grants_e_and_waits_for_the_unblock():
    d = new_dir()
    out = d.step(GetS(K, "a"), 0)
    assert out == [
        PersistEntry(
            K,
            {
                "state": "O",
                "owner": "a",
                "owner_txn": "1",
                "sharers": "{}",
                "version": "0",
                "txn": "1",
            },
        ),
        Send("a", Data(K, HOME, 1, State.E, None, 0)),
    ]
    assert d.is_busy(K)
    assert finish(d, "a") == []
    assert not d.is_busy(K)


def test_gets_on_s_grants_s_with_a_lease():
    d = shared_by("a", "b")
    out = d.step(GetS(K, "c"), 0)
    assert messages(out) == [Data(K, HOME, d.entry(K).txn, State.S, None, 0, LEASE)]
    assert persisted(out)[K]["sharers"] == '{"a":1,"b":2,"c":3}'


def test_gets_from_the_only_sharer_grants_e():
    d = shared_by("a")
    out = d.step(GetS(K, "a"), 0)
    assert messages(out)[0].state is State.E
    assert d.entry(K).owner == "a" and d.entry(K).sharers == {}


def test_gets_when_every_other_sharer_is_past_its_lease_grants_e():
    d = shared_by("a", "b", now=0)
    out = d.step(GetS(K, "c"), LEASE)  # a and b unblocked at 0: leases end at LEASE
    assert messages(out)[0].state is State.E
    assert d.entry(K).sharers == {}


def test_gets_on_owned_forwards_to_the_owner():
    d = owned_by("a")
    out = d.step(GetS(K, "b"), 0)
    assert messages(out) == [FwdGetS(K, HOME, 2, "b", LEASE)]
    assert d.is_busy(K)


@pytest.mark.parametrize("unblock_first", [False, True])
def test_fwd_gets_completes_with_both_fwd_done_and_unblock(unblock_first):
    d = owned_by("a")
    d.step(GetS(K, "b"), 0)
    if unblock_first:
        assert finish(d, "b", 5) == []
    out = d.step(FwdDone(K, "a", 2, True, '"new"', 3, kept=True), 7)
    assert messages(out) == []  # the owner served the requester itself
    if not unblock_first:
        assert d.is_busy(K)
        finish(d, "b", 9)
    entry = d.entry(K)
    assert not d.is_busy(K)
    assert (entry.state, entry.data, entry.version) == (DirState.S, '"new"', 3)
    assert entry.sharers == {"a": 2, "b": 2}
    assert entry.leases == {"a": 7 + LEASE, "b": (5 if unblock_first else 9) + LEASE}


def test_fwd_done_without_data_serves_the_requester_from_the_home():
    d = owned_by("a", version=4, data='"home"')
    d.step(GetS(K, "b"), 0)
    out = d.step(FwdDone(K, "a", 2, has_data=False), 0)
    assert messages(out) == [Data(K, HOME, 2, State.E, '"home"', 4)]
    assert d.entry(K).owner == "b"


def test_gets_from_the_owner_itself_is_served_from_the_home():
    d = owned_by("a", version=4, data='"home"')
    out = d.step(GetS(K, "a"), 0)
    assert messages(out) == [Data(K, HOME, 2, State.E, '"home"', 4)]


# ---- GetM --------------------------------------------------------------------------------


def test_getm_on_i_grants_m_at_the_current_version():
    # The writer numbers its write version + 1 (see lines.py): the grant carries the
    # version of the value it hands over.
    d = new_dir()
    d.restore(K, DirEntry(K, version=6, data='"x"', txn=2).to_hash(), 0)
    out = d.step(GetM(K, "a"), 0)
    assert messages(out) == [Data(K, HOME, 3, State.M, '"x"', 6)]
    assert d.entry(K).owner == "a"


def test_getm_on_s_invalidates_every_other_sharer_before_granting():
    d = shared_by("a", "b", "c")
    out = d.step(GetM(K, "b"), 0)
    txn = d.entry(K).txn
    assert messages(out) == [Inv(K, HOME, txn), Inv(K, HOME, txn)]
    assert [s.to for s in out if isinstance(s, Send)] == ["a", "c"]
    assert messages(d.step(InvAck(K, "c", txn), 0)) == []
    assert d.entry(K).sharers == {"a": 1, "b": 2}  # b keeps its copy until granted M
    out = d.step(InvAck(K, "a", txn), 0)
    assert messages(out) == [Data(K, HOME, txn, State.M, None, 0)]
    entry = d.entry(K)
    assert (entry.state, entry.owner, entry.sharers) == (DirState.OWNED, "b", {})
    assert d.is_busy(K)
    finish(d, "b")
    assert not d.is_busy(K)


def test_getm_on_owned_forwards_and_hands_ownership_over():
    d = owned_by("a")
    assert messages(d.step(GetM(K, "b"), 0)) == [FwdGetM(K, HOME, 2, "b")]
    d.step(FwdDone(K, "a", 2, True, '"d"', 5), 0)
    finish(d, "b")
    entry = d.entry(K)
    assert (entry.owner, entry.owner_txn, entry.data, entry.version) == ("b", 2, '"d"', 5)


def test_fwd_getm_to_an_owner_with_nothing_grants_m_from_the_home():
    d = owned_by("a", version=2, data='"h"')
    d.step(GetM(K, "b"), 0)
    out = d.step(FwdDone(K, "a", 2, has_data=False), 0)
    assert messages(out) == [Data(K, HOME, 2, State.M, '"h"', 2)]


# ---- Inv-Ack -----------------------------------------------------------------------------


def test_inv_ack_with_dirty_data_is_adopted_if_newer():
    d = shared_by("a", "b")
    d.step(GetM(K, "b"), 0)
    txn = d.entry(K).txn
    d.step(InvAck(K, "a", txn, dirty=True, data='"w"', version=9), 0)
    assert (d.entry(K).data, d.entry(K).version) == ('"w"', 9)


def test_inv_ack_with_older_data_keeps_the_home_value():
    d = new_dir()
    d.restore(
        K, DirEntry(K, DirState.S, sharers={"a": 1}, version=5, data='"h"', txn=1).to_hash(), 0
    )
    d.step(GetM(K, "b"), 0)
    d.step(InvAck(K, "a", 2, dirty=True, data='"old"', version=4), 0)
    assert (d.entry(K).data, d.entry(K).version) == ('"h"', 5)


@pytest.mark.parametrize(
    "ack", [InvAck(K, "a", 99), InvAck(K, "zz", 3), InvAck(K, "b", 3)], ids=["txn", "who", "req"]
)
def test_stale_inv_acks_are_ignored(ack):
    d = shared_by("a", "b")
    d.step(GetM(K, "b"), 0)  # txn 3, waits for a only
    assert d.step(ack, 0) == []
    assert d.is_busy(K) and d.stale_dropped == 1


# ---- lease expiry ------------------------------------------------------------------------


def test_a_silent_sharer_delays_a_write_by_at_most_its_lease():
    d = shared_by("a", "b", now=10)  # leases end at 10 + LEASE
    d.step(GetM(K, "b"), 20)
    assert d.next_deadline() == 10 + LEASE
    assert d.tick(10 + LEASE - 1) == []
    out = d.tick(10 + LEASE)
    assert messages(out) == [Data(K, HOME, d.entry(K).txn, State.M, None, 0)]
    assert d.lease_drops == 1 and d.next_deadline() is None
    assert d.step(InvAck(K, "a", d.entry(K).txn), 10 + LEASE) == []  # too late: ignored


def test_any_message_also_catches_up_on_overdue_leases():
    d = shared_by("a", "b", now=0)
    d.step(GetM(K, "b"), 10)
    out = d.step(GetS(K, "c"), LEASE)  # no tick came, but a's lease is over
    assert messages(out) == [Data(K, HOME, d.entry(K).txn, State.M, None, 0)]


def test_sharers_already_past_their_lease_get_no_inv():
    d = shared_by("a", "b", now=0)
    out = d.step(GetM(K, "c"), LEASE)
    assert messages(out) == [Data(K, HOME, d.entry(K).txn, State.M, None, 0)]


def test_a_sharers_lease_is_counted_from_its_unblock():
    d = shared_by("a", "b")
    d.step(GetS(K, "c"), 10)
    finish(d, "c", 30)
    assert d.entry(K).leases["c"] == 30 + LEASE


# ---- serialisation -----------------------------------------------------------------------


def test_requests_on_a_busy_key_wait_their_turn_fifo():
    d = new_dir()
    d.step(GetS(K, "a"), 0)
    assert d.step(GetM(K, "b"), 0) == []
    assert d.step(GetS(K, "c"), 0) == []
    out = finish(d, "a")  # a done: b's GetM starts (a owns: forward)
    assert messages(out) == [FwdGetM(K, HOME, 2, "b")]
    d.step(FwdDone(K, "a", 2, True, None, 0), 0)
    out = finish(d, "b")  # b done: c's GetS starts
    assert messages(out) == [FwdGetS(K, HOME, 3, "c", LEASE)]


def test_keys_are_independent():
    d = new_dir()
    d.step(GetS("x", "a"), 0)
    assert messages(d.step(GetS("y", "a"), 0)) == [Data("y", HOME, 1, State.E, None, 0)]


def test_stale_unblock_is_ignored():
    d = new_dir()
    d.step(GetS(K, "a"), 0)
    assert d.step(Unblock(K, "a", 7), 0) == [] and d.is_busy(K)
    assert d.step(Unblock(K, "b", 1), 0) == [] and d.is_busy(K)


# ---- PutS / PutE / PutM ------------------------------------------------------------------


def test_puts_removes_the_sharer_without_an_ack():
    d = shared_by("a", "b")
    assert d.step(PutS(K, "a", 1), 0) == [PersistEntry(K, d.entry(K).to_hash())]
    assert d.entry(K).sharers == {"b": 2}
    d.step(PutS(K, "b", 2), 0)
    assert d.entry(K).state is DirState.I


def test_stale_puts_from_an_older_grant_is_ignored():
    d = shared_by("a", "b")
    assert d.step(PutS(K, "a", 7), 0) == []
    assert "a" in d.entry(K).sharers


def test_pute_from_the_owner_frees_the_key():
    d = owned_by("a", version=2, data='"h"')
    assert d.step(PutE(K, "a", 1, 2), 0)[-1] == Send("a", PutAck(K, HOME, 1))
    entry = d.entry(K)
    assert (entry.state, entry.owner, entry.data) == (DirState.I, None, '"h"')


def test_putm_writes_back_and_frees_the_key():
    d = owned_by("a", version=2)
    out = d.step(PutM(K, "a", 1, 5, '"wb"'), 0)
    assert persisted(out)[K]["value"] == '"wb"'
    assert messages(out) == [PutAck(K, HOME, 1)]
    assert (d.entry(K).state, d.entry(K).version) == (DirState.I, 5)


@pytest.mark.parametrize(
    "put",
    [PutM(K, "b", 1, 5, '"x"'), PutM(K, "a", 0, 5, '"x"'), PutM(K, "a", 1, 1, '"x"')],
    ids=["not-owner", "old-grant", "old-version"],
)
def test_stale_putm_is_acked_but_changes_nothing(put):
    d = owned_by("a", version=2, data='"h"')
    out = d.step(put, 0)
    assert out == [Send(put.sender, PutAck(K, HOME, put.txn))]
    assert (d.entry(K).owner, d.entry(K).data) == ("a", '"h"')


def test_putm_arriving_during_a_forward_waits_and_is_then_stale():
    d = owned_by("a")
    d.step(GetM(K, "b"), 0)
    assert d.step(PutM(K, "a", 1, 3, '"wb"'), 0) == []  # queued behind the forward
    d.step(FwdDone(K, "a", 2, True, '"wb"', 3), 0)
    out = finish(d, "b")
    assert messages(out) == [PutAck(K, HOME, 1)]
    assert d.entry(K).owner == "b"


# ---- hash mirror -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        DirEntry(K),
        DirEntry(K, DirState.S, sharers={"b": 4, "a": 2}, version=3, data="[1]", txn=4),
        DirEntry(K, DirState.OWNED, owner="a", owner_txn=7, version=2, data="null", txn=7),
    ],
)
def test_hash_round_trip_restarts_leases(entry):
    fields = entry.to_hash()
    assert all(isinstance(v, str) for v in fields.values())
    back = DirEntry.from_hash(K, fields, now_ms=500, lease_ms=LEASE)
    assert back.leases == {n: 500 + LEASE for n in entry.sharers}
    back.leases = {}
    assert back == entry
    assert list(json.loads(fields["sharers"])) == sorted(entry.sharers)  # deterministic


def test_restarted_home_waits_a_full_lease_for_silent_sharers():
    d = shared_by("a", "b", now=0)
    fields = d.entry(K).to_hash()
    d2 = new_dir()
    d2.restore(K, fields, now_ms=1_000)  # a restart; leases restart at full length
    d2.step(GetM(K, "b"), 1_000)
    assert d2.next_deadline() == 1_000 + LEASE


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"state": "Q", "version": "0", "txn": "0"},
        {"state": "O", "version": "0", "txn": "0"},  # owned without an owner
        {"state": "S", "version": "0", "txn": "0", "sharers": "{}"},
        {"state": "S", "version": "0", "txn": "0", "sharers": '{"a": "x"}'},
        {"state": "I", "version": "0", "txn": "0", "value": "{bad"},
    ],
)
def test_malformed_or_inconsistent_hash_is_refused(fields):
    with pytest.raises(ValueError, match="'k'"):
        DirEntry.from_hash(K, fields, now_ms=0, lease_ms=LEASE)


def test_persist_comes_before_every_send():
    d = shared_by("a", "b")
    out = d.step(GetM(K, "c"), 0)
    kinds = [type(a).__name__ for a in out]
    assert kinds == ["PersistEntry", "Send", "Send"]


def test_lease_must_be_positive():
    with pytest.raises(ValueError):
        Directory(HOME, lease_ms=0)


# ---- retired entries (deleted keys nobody holds) ----------------------------------------------


def deleted_and_evicted(version: int = 5) -> tuple[Directory, list]:
    """`a` deleted K (version `version`, txn 1) and then evicted it: the entry is unused."""
    d = owned_by("a")
    return d, d.step(PutM(K, "a", 1, version, None), 0)


def test_an_entry_with_no_copy_and_no_value_is_retired_behind_a_floor():
    d, out = deleted_and_evicted(version=5)
    assert out == [
        PersistEntry("", {"txn": "1", "version": "5"}),  # before the deletion it allows
        PersistEntry(K, None),
        Send("a", PutAck(K, HOME, 1)),
    ]
    assert list(d.entries()) == [] and d.retired == 1
    assert (d.entry(K).txn, d.entry(K).version) == (1, 5)
    # The key comes back above everything it had: a new txn, and version 5 reads absent.
    out = d.step(GetM(K, "b"), 0)
    assert messages(out) == [Data(K, HOME, 2, State.M, None, 5)]
    assert persisted(out)[K]["txn"] == "2"


def test_a_key_with_a_value_or_a_copy_keeps_its_entry():
    d = owned_by("a")
    d.step(PutM(K, "a", 1, 1, '"x"'), 0)  # evicted, but the home keeps its value
    assert [e.key for e in d.entries()] == [K]
    d2 = new_dir()  # a copy of an absent value keeps the entry too
    d2.step(GetS(K, "b"), 0)
    finish(d2, "b")
    assert d2.entry(K).owner == "b" and [e.key for e in d2.entries()] == [K]


def test_a_busy_or_queued_key_is_not_retired():
    d = owned_by("a")
    d.step(GetS(K, "b"), 0)  # forwarded to a: busy
    d.step(PutM(K, "a", 1, 2, None), 0)  # a's eviction crosses the forward: queued
    assert d.is_busy(K) and [e.key for e in d.entries()] == [K]


def test_the_floor_only_grows_and_is_written_only_when_it_does():
    d, _ = deleted_and_evicted(version=5)
    d.step(GetS("other", "b"), 0)
    d.step(Unblock("other", "b", 2), 0)  # txn 2: from the floor (1) + 1
    out = d.step(PutE("other", "b", 2, 5), 0)
    assert persisted(out) == {"": {"txn": "2", "version": "5"}, "other": None}
    d.step(GetS("third", "b"), 0)
    d.step(Unblock("third", "b", 3), 0)
    d.step(PutE("third", "b", 3, 5), 0)
    d.retired_txn = 9  # as if a later key had raised it
    out = d.step(PutE("third", "b", 3, 5), 0)  # a late duplicate: stale, no floor change
    assert persisted(out) == {"third": None}
    assert messages(out) == [PutAck("third", HOME, 3)]


def test_a_late_notice_for_a_retired_key_is_acked_and_leaves_nothing():
    d, _ = deleted_and_evicted()
    out = d.step(PutM(K, "a", 1, 5, None), 0)  # the eviction notice again
    assert messages(out) == [PutAck(K, HOME, 1)]
    assert list(d.entries()) == [] and d.stale_dropped == 1


def test_a_restarted_home_starts_unknown_keys_from_its_persisted_floor():
    _, out = deleted_and_evicted(version=5)
    restarted = new_dir()
    restarted.restore("", persisted(out)[""], 0)
    assert (restarted.entry("new").txn, restarted.entry("new").version) == (1, 5)
    assert messages(restarted.step(GetS("new", "b"), 0)) == [
        Data("new", HOME, 2, State.E, None, 5)
    ]
    with pytest.raises(ValueError, match="retired floor"):
        new_dir().restore("", {"txn": "x"}, 0)


def test_a_restarted_home_retires_the_unused_entries_it_loads():
    d = new_dir()
    d.restore("gone", DirEntry("gone", version=4, txn=6).to_hash(), 0)
    d.restore("kept", DirEntry("kept", version=1, data='"v"', txn=2).to_hash(), 0)
    d.restore(K, DirEntry(K, DirState.S, sharers={"a": 3}, txn=3).to_hash(), 0)
    assert d.retire_unused() == [
        PersistEntry("", {"txn": "6", "version": "4"}),
        PersistEntry("gone", None),
    ]
    assert sorted(e.key for e in d.entries()) == ["k", "kept"] and d.retire_unused() == []
