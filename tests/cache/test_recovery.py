"""The recovering cores (service/cache/recovery.py): one test per extension, then seeded
runs of the fault-injecting simulation (duplicates, loss, homes restarting mid-transaction)
and proof that it catches each extension being switched off."""

from __future__ import annotations

import pytest

from service.cache import (
    Data,
    DirEntry,
    DirState,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    Inv,
    InvAck,
    LocalRead,
    LocalWrite,
    PersistEntry,
    PersistLine,
    PutAck,
    PutM,
    Send,
    State,
    Unblock,
)
from service.cache.directory import Directory
from service.cache.lines import LineCache
from service.cache.recovery import RecoveringDirectory, RecoveringLineCache

from . import faulty_sim
from .sim import SimFailure
from .util import messages, persisted, replies

NODE, HOME, PEER = "n1", "h", "n2"
LEASE, RESEND, REQ = 100, 50, 1_000


def cache(**kw) -> RecoveringLineCache:
    return RecoveringLineCache(NODE, lambda key: HOME, resend_ms=RESEND, req_base=REQ, **kw)


def home() -> RecoveringDirectory:
    return RecoveringDirectory(HOME, lease_ms=LEASE, resend_ms=RESEND)


def owning(state: State = State.M, key: str = "k", txn: int = 1, **kw) -> RecoveringLineCache:
    c = cache(**kw)
    c.step(LocalWrite(0, key, "v") if state is State.M else LocalRead(0, key), 0)
    c.step(Data(key, HOME, txn, State.M if state is State.M else State.E, '"v"', 0, 0, REQ), 0)
    assert c.state(key, 0) is state
    return c


# ---- node: requests carry ids and are re-sent ----------------------------------------------


def test_requests_carry_a_fresh_id_and_are_re_sent_with_it():
    c = cache()
    assert messages(c.step(LocalRead(1, "a"), 0)) == [GetS("a", NODE, REQ)]
    assert messages(c.step(LocalWrite(2, "b", 1), 0)) == [GetM("b", NODE, REQ + 1)]
    assert c.tick(RESEND - 1) == []
    assert messages(c.tick(RESEND)) == [GetS("a", NODE, REQ), GetM("b", NODE, REQ + 1)]
    assert c.tick(RESEND + 10) == [] and messages(c.tick(2 * RESEND)) != []


def test_an_eviction_notice_is_re_sent_until_its_put_ack():
    c = owning(State.M, key="a", max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    c.step(Data("b", HOME, 1, State.E, '"b"', 1, 0, REQ + 1), 0)  # evicts a: PutM
    assert messages(c.tick(RESEND)) == [PutM("a", NODE, 1, 1, '"v"')]
    c.step(PutAck("a", HOME, 1), RESEND)
    assert c.tick(3 * RESEND) == []


# ---- node: duplicates and unmatched grants -------------------------------------------------


def test_a_repeated_grant_is_acknowledged_again_and_changes_nothing():
    c = owning(State.M)
    before = c.line("k")
    out = c.step(Data("k", HOME, 1, State.M, '"older"', 0, 0, REQ), 5)
    assert out == [Send(HOME, Unblock("k", NODE, 1))]
    assert c.line("k") == before


def test_a_shared_grant_for_another_request_never_serves():
    c = cache()
    c.step(LocalRead(1, "k"), 0)  # GetS with req REQ
    out = c.step(Data("k", HOME, 4, State.S, '"old"', 3, LEASE, req=REQ - 7), 10)
    assert messages(out) == [] and replies(out) == []  # the home does not wait for it
    assert c.state("k", 10) is State.I and c.unmatched == 1
    assert messages(c.tick(RESEND)) == [GetS("k", NODE, REQ)]  # still asking
    out = c.step(Data("k", HOME, 5, State.S, '"new"', 4, LEASE, req=REQ), 60)
    assert [r.data for r in replies(out)] == ['"new"']


def test_an_exclusive_grant_nobody_asked_for_is_not_installed():
    c = cache()  # e.g. restarted after asking: the home waits for the Unblock
    out = c.step(Data("k", HOME, 2, State.M, '"v"', 1, 0, req=77), 0)
    assert messages(out) == [Unblock("k", NODE, 2)]
    assert c.state("k", 0) is State.I
    # A forward for the copy it never took: "nothing here", and the home serves its value.
    assert messages(c.step(FwdGetM("k", HOME, 3, PEER, 9), 0)) == [
        FwdDone("k", NODE, 3, has_data=False)
    ]


def test_an_owner_keeps_its_newer_copy_when_granted_again():
    c = owning(State.M)
    c.step(LocalWrite(5, "k", "newer"), 0)  # version 2 now
    out = c.step(Data("k", HOME, 3, State.M, '"v"', 0, 0, req=REQ), 0)
    assert messages(out) == [Unblock("k", NODE, 3)]
    line = c.line("k")
    assert (line.state, line.data, line.version, line.txn) == (State.M, '"newer"', 2, 3)


# ---- shared grants end their transaction at once (no Unblock) -----------------------------


def test_a_node_acknowledges_exclusive_grants_but_not_shared_ones():
    c = cache()
    c.step(LocalRead(1, "s"), 0)
    assert messages(c.step(Data("s", HOME, 1, State.S, '"v"', 1, LEASE, REQ), 0)) == []
    c.step(LocalRead(2, "e"), 0)
    out = c.step(Data("e", HOME, 1, State.E, '"v"', 1, 0, REQ + 1), 0)
    assert messages(out) == [Unblock("e", NODE, 1)]
    c.step(LocalWrite(3, "m", 1), 0)
    out = c.step(Data("m", HOME, 1, State.M, None, 0, 0, REQ + 2), 0)
    assert messages(out) == [Unblock("m", NODE, 1)]


def test_a_repeated_shared_grant_is_acknowledged_for_a_home_that_waits():
    # A home of an older version waits for an Unblock after every grant and re-sends
    # the grant until one comes: the same txn again gets it.
    c = cache()
    c.step(LocalRead(1, "k"), 0)
    grant = Data("k", HOME, 1, State.S, '"v"', 1, LEASE, REQ)
    c.step(grant, 0)
    assert messages(c.step(grant, 5)) == [Unblock("k", NODE, 1)]


def test_a_home_ends_a_shared_grant_at_once_and_counts_the_lease_from_it():
    d = home()
    d.restore("k", DirEntry("k", DirState.S, sharers={"a": 1}, txn=1).to_hash(), 0)
    assert messages(d.step(GetS("k", "r", 5), 10)) == [
        Data("k", HOME, 2, State.S, None, 0, LEASE, 5)
    ]
    assert not d.is_busy("k")
    # The next request starts right away; r's lease runs from the grant (t=10), which
    # is after r sent its GetS, so r's copy stops serving no later than the home drops it.
    out = d.step(GetM("k", "w", 6), 20)
    assert sorted(m.to for m in out if isinstance(m, Send)) == ["a", "r"]
    assert d.entry("k").leases["r"] == 10 + LEASE
    d.step(InvAck("k", "a", 3), 30)
    grant = Data("k", HOME, 3, State.M, None, 0, 0, 6)
    assert grant not in messages(d.tick(10 + LEASE - 1))  # (the Inv to r is re-sent)
    assert grant in messages(d.tick(10 + LEASE))  # r's lease is over: it is dropped


def test_a_home_ends_a_forwarded_shared_grant_with_the_fwd_done():
    d = home()
    start_forward(d)
    d.step(FwdDone("k", "o", 2, True, '"v"', 3, kept=False), 40)
    assert not d.is_busy("k") and d.entry("k").sharers == {"r": 2}
    assert d.entry("k").leases == {"r": 40 + LEASE}  # counted from the FwdDone
    assert messages(d.step(GetM("k", "w", 6), 50)) == [Inv("k", HOME, 3)]


def test_a_home_still_waits_for_the_unblock_of_an_exclusive_grant():
    d = home()
    d.step(GetS("k", "r", 5), 0)  # nobody else holds k: Data(E)
    assert d.is_busy("k")
    assert d.step(GetS("k", "x", 6), 1) == []  # queued behind it
    out = d.step(Unblock("k", "r", 1), 2)
    assert Send("r", FwdGetS("k", HOME, 2, "x", LEASE, 6)) in out


def test_a_shared_grant_that_arrives_after_its_lease_serves_nothing():
    # Found by the faulty simulation (seed 1981): the home ended the GetS at its grant,
    # the grant stayed in flight past the lease, the home dropped the silent sharer
    # without an Inv and granted a write. The late grant's value may be stale.
    d, c = home(), cache()
    d.restore("k", DirEntry("k", DirState.S, sharers={"a": 1}, txn=1).to_hash(), 0)
    get = messages(c.step(LocalRead(1, "k"), 0))
    assert get == [GetS("k", NODE, REQ)]
    grant = messages(d.step(get[0], 5))
    assert grant == [Data("k", HOME, 2, State.S, None, 0, LEASE, REQ)]
    out = d.step(GetM("k", "w", 9), 5 + LEASE)  # both sharers' leases are over: no Inv
    assert messages(out) == [Data("k", HOME, 3, State.M, None, 0, 0, 9)]
    out = c.step(grant[0], 5 + LEASE + 1)
    assert replies(out) == [] and messages(out) == [GetS("k", NODE, REQ + 1)]
    out = c.step(Data("k", HOME, 4, State.S, '"w"', 1, LEASE, REQ + 1), 5 + LEASE + 2)
    assert [r.data for r in replies(out)] == ['"w"']


def test_a_shared_grant_within_its_lease_serves_the_reads_queued_for_it():
    c = cache()
    c.step(LocalRead(1, "k"), 0)
    c.step(LocalRead(2, "k"), 10)  # queued behind the GetS
    out = c.step(Data("k", HOME, 2, State.S, '"v"', 1, LEASE, REQ), LEASE - 1)
    assert [r.op for r in replies(out)] == [1, 2] and messages(out) == []


def test_an_inv_that_overtakes_a_shared_grant_makes_the_node_ask_again():
    # The home ended the GetS at its grant and began a GetM whose Inv got here first:
    # the grant is older than the Inv, so it must not serve; the read asks again.
    c = cache()
    c.step(LocalRead(1, "k"), 0)
    assert messages(c.step(Inv("k", HOME, 3), 1)) == [InvAck("k", NODE, 3)]
    out = c.step(Data("k", HOME, 2, State.S, '"old"', 1, LEASE, REQ), 2)
    assert replies(out) == [] and messages(out) == [] and c.state("k", 2) is State.I
    assert messages(c.tick(RESEND)) == [GetS("k", NODE, REQ)]
    out = c.step(Data("k", HOME, 4, State.S, '"new"', 2, LEASE, REQ), RESEND + 1)
    assert [r.data for r in replies(out)] == ['"new"']


# ---- node: forwards answered once, and again the same way ---------------------------------


def test_a_hand_over_is_recorded_durably_and_a_repeated_forward_gets_the_same_answer():
    c = owning(State.M)
    fwd = FwdGetM("k", HOME, 2, PEER, 55)
    first = c.step(fwd, 0)
    assert messages(first) == [
        Data("k", NODE, 2, State.M, '"v"', 1, 0, 55),
        FwdDone("k", NODE, 2, True, '"v"', 1, kept=False),
    ]
    fields = persisted(first)["k"]
    assert fields["state"] == "I" and fields["h_txn"] == "2" and fields["h_value"] == '"v"'
    assert messages(c.step(fwd, 5)) == messages(first)  # a duplicate, or a home re-send
    assert c.write_backs == 1  # the modified value went home once, in the first FwdDone
    c.step(PutAck("k", HOME, 2), 6)  # the home has the hand-over: the record goes
    assert c.handoff("k") is None
    # An even later copy gets "nothing here", which the home (done with txn 2) drops.
    assert messages(c.step(fwd, 7)) == [FwdDone("k", NODE, 2, has_data=False)]


def test_a_restarted_owner_sends_its_hand_over_again():
    c = owning(State.M)
    out = c.step(FwdGetS("k", HOME, 2, PEER, LEASE, 55), 0)
    restarted = cache()
    restarted.restore("k", persisted(out)["k"])
    assert restarted.state("k", 0) is State.I  # the kept S copy reloads as I
    assert messages(restarted.recover()) == [
        Data("k", NODE, 2, State.S, '"v"', 1, LEASE, 55),
        FwdDone("k", NODE, 2, True, '"v"', 1, kept=True),
    ]


def test_a_restart_deletes_the_hashes_it_does_not_need():
    # Earlier versions left I tombstones and S lines on disk for every key ever held.
    restarted = cache()
    restarted.restore("old", {"state": "I", "version": "3", "txn": "7"})
    restarted.restore("shared", {"state": "S", "version": "1", "txn": "2", "value": '"s"'})
    restarted.restore("owned", {"state": "M", "version": "2", "txn": "3", "value": '"m"'})
    assert restarted.recover() == [
        PersistLine(NODE, "old", None),
        PersistLine(NODE, "shared", None),
    ]
    assert restarted.state("owned", 0) is State.M and restarted.recover() == []


def test_nothing_here_is_said_again_and_makes_older_grants_stale():
    c = cache()
    c.step(LocalWrite(1, "k", "x"), 0)  # GetM in flight; the grant (txn 1) is delayed
    fwd = FwdGetS("k", HOME, 2, PEER, LEASE, 9)  # a restarted home moved on to txn 2
    assert messages(c.step(fwd, 0)) == [FwdDone("k", NODE, 2, has_data=False)]
    assert messages(c.step(fwd, 1)) == [FwdDone("k", NODE, 2, has_data=False)]
    late = c.step(Data("k", HOME, 1, State.M, '"v"', 0, 0, REQ), 2)
    assert replies(late) == [] and c.state("k", 2) is State.I


def test_a_forward_to_a_shared_copy_is_not_a_hand_over():
    c = cache()
    c.step(LocalRead(1, "k"), 0)
    c.step(Data("k", HOME, 1, State.S, '"old"', 1, LEASE, REQ), 0)
    out = c.step(FwdGetM("k", HOME, 3, PEER, 9), 0)  # the home thinks we own it
    assert messages(out) == [FwdDone("k", NODE, 3, has_data=False)]
    assert c.state("k", 0) is State.I  # and the S copy stops serving


def test_an_inv_for_a_copy_we_do_not_have_makes_older_grants_stale():
    c = cache()
    c.step(LocalRead(1, "k"), 0)
    assert messages(c.step(Inv("k", HOME, 3), 0)) == [InvAck("k", NODE, 3)]
    late = c.step(Data("k", HOME, 2, State.S, '"v"', 1, LEASE, REQ), 1)
    assert replies(late) == [] and c.state("k", 1) is State.I


def test_an_evicted_line_leaves_nothing_behind_and_a_late_grant_is_still_not_installed():
    # Nothing asks for "a" any more, so no grant can answer a request of ours: its hash
    # is deleted, no floor is kept, and a late duplicate of its grant is acked, not used.
    c = owning(State.E, key="a", max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    c.step(Data("b", HOME, 1, State.E, '"b"', 1, 0, REQ + 1), 0)  # evicts a: PutE
    out = c.step(PutAck("a", HOME, 1), 0)
    assert persisted(out) == {"a": None}
    assert c.floor("a") is None
    assert c.step(Data("a", HOME, 1, State.E, '"v"', 0, 0, REQ), 0) == [
        Send(HOME, Unblock("a", NODE, 1))
    ]
    assert c.state("a", 0) is State.I and c.state("b", 0) is State.E
    restarted = cache()
    assert replies(restarted.step(Data("a", HOME, 1, State.E, '"v"', 0, 0, REQ), 0)) == []


def test_a_floor_lasts_while_the_request_is_outstanding_and_never_reaches_the_disk():
    c = owning(State.M, key="k", max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    c.step(Data("b", HOME, 1, State.E, '"b"', 1, 0, REQ + 1), 0)  # evicts k: PutM
    c.step(LocalRead(2, "k"), 0)  # waits for the eviction to finish
    out = c.step(PutAck("k", HOME, 1), 0)  # buffer gone; our GetS goes out
    assert messages(out) == [GetS("k", NODE, REQ + 2)] and c.floor("k") == 1
    assert persisted(out)["k"] is None  # the evicting line on disk is deleted, not a tombstone
    # A grant from before, even one carrying our request's id, is old.
    assert c.step(Data("k", HOME, 1, State.E, '"v"', 1, 0, REQ + 2), 0) == [
        Send(HOME, Unblock("k", NODE, 1))
    ]
    assert c.state("k", 0) is State.I and c.floor("k") == 1
    out = c.step(Inv("k", HOME, 5), 0)  # acked with no copy while our GetS is out
    assert messages(out) == [InvAck("k", NODE, 5)] and c.floor("k") == 5
    assert persisted(out) == {}
    assert replies(c.step(Data("k", HOME, 4, State.S, '"old"', 1, LEASE, REQ + 2), 0)) == []
    assert c.state("k", 0) is State.I
    c.step(Data("k", HOME, 6, State.S, '"new"', 2, LEASE, REQ + 2), 0)  # the real answer
    assert c.state("k", 0) is State.S and c.floor("k") is None


def test_a_floor_left_when_the_request_ends_some_other_way_is_dropped_on_the_next_tick():
    c = cache()
    c.step(LocalRead(1, "k"), 0)
    c.step(Inv("k", HOME, 5), 0)
    assert c.floor("k") == 5
    c._pending["k"].request = None  # as if the request ended without a line
    c.tick(0)
    assert c.floor("k") is None


# ---- home ---------------------------------------------------------------------------------


def start_forward(d: RecoveringDirectory) -> list:
    d.step(GetM("k", "o", 1), 0)
    d.step(Unblock("k", "o", 1), 0)
    return d.step(GetS("k", "r", 5), 10)


def test_a_forward_in_progress_is_persisted_and_survives_a_home_restart():
    d = home()
    out = start_forward(d)
    assert Send("o", FwdGetS("k", HOME, 2, "r", LEASE, 5)) in out
    fields = next(a.fields for a in out if isinstance(a, PersistEntry))
    assert (fields["fwd_owner"], fields["fwd_to"], fields["fwd_want"]) == ("o", "r", "S")
    restarted = home()
    restarted.restore("k", fields, 100)
    assert restarted.is_busy("k")
    assert messages(restarted.tick(100)) == [FwdGetS("k", HOME, 2, "r", LEASE, 5)]
    out = restarted.step(FwdDone("k", "o", 2, True, '"v"', 3, kept=True), 101)
    assert Send("o", PutAck("k", HOME, 2)) in out  # the owner may drop its record
    assert "fwd_txn" not in next(a.fields for a in out if isinstance(a, PersistEntry))
    assert not restarted.is_busy("k")  # a shared grant: no Unblock awaited
    assert sorted(restarted.entry("k").sharers) == ["o", "r"]


def test_a_home_re_sends_the_grant_until_unblocked():
    d = home()
    out = d.step(GetM("k", "r", 5), 0)
    grant = Data("k", HOME, 1, State.M, None, 0, 0, 5)
    assert messages(out) == [grant]
    assert d.tick(RESEND - 1) == []
    assert messages(d.tick(RESEND)) == [grant]
    d.step(Unblock("k", "r", 1), RESEND + 1)
    assert d.tick(5 * RESEND) == []


def test_a_home_re_sends_invalidations_to_sharers_that_have_not_acked():
    d = home()
    d.restore("k", DirEntry("k", DirState.S, sharers={"a": 1, "b": 1}, txn=1).to_hash(), 0)
    d.step(GetM("k", "c", 5), 0)
    d.step(InvAck("k", "a", 2), 1)
    assert messages(d.tick(RESEND)) == [Inv("k", HOME, 2)]


def test_a_re_sent_request_of_the_running_transaction_is_ignored():
    d = home()
    d.step(GetM("k", "r", 5), 0)
    assert d.step(GetM("k", "r", 5), 1) == [] and d.duplicates == 1
    d.step(GetS("k", "x", 6), 2)  # queued
    assert d.step(GetS("k", "x", 6), 3) == [] and d.duplicates == 2


def test_an_owner_asking_again_gets_the_same_grant_not_a_new_one():
    d = home()
    d.step(GetM("k", "o", 5), 0)
    d.step(Unblock("k", "o", 1), 0)
    assert messages(d.step(GetM("k", "o", 5), 1)) == [Data("k", HOME, 1, State.M, None, 0, 0, 5)]
    assert d.entry("k").txn == 1 and d.entry("k").owner_txn == 1
    assert d.step(GetS("k", "o", 4), 2) == []  # older: a late duplicate
    out = d.step(GetS("k", "o", 9), 3)  # newer: the owner really lost its copy
    assert messages(out) == [Data("k", HOME, 2, State.E, None, 0, 0, 9)]


def test_the_owners_request_id_survives_a_home_restart():
    d = home()
    out = d.step(GetM("k", "o", 5), 0)
    fields = next(a.fields for a in out if isinstance(a, PersistEntry))
    assert fields["owner_req"] == "5"
    restarted = home()
    restarted.restore("k", fields, 10)
    assert messages(restarted.step(GetM("k", "o", 5), 10)) == [
        Data("k", HOME, 1, State.M, None, 0, 0, 5)
    ]


def test_a_write_back_after_a_lost_re_grant_and_a_home_restart_is_kept():
    # The base directory re-grants on a duplicate request of the owner; if that grant
    # is lost with a home restart, the owner's PutM carries the older txn and is refused.
    d = home()
    c = cache()
    c.step(LocalWrite(1, "k", "dirty"), 0)
    grant = messages(d.step(GetM("k", NODE, REQ), 0))[0]
    for action in c.step(grant, 0):
        if isinstance(action, Send):
            d.step(action.message, 0)
    assert d.step(GetM("k", NODE, REQ), 1) != []  # a late duplicate: same grant again
    restarted = home()
    restarted.restore("k", d.entry("k").to_hash() | {"owner_req": str(REQ)}, 2)
    put = PutM("k", NODE, 1, 1, '"dirty"')
    assert messages(restarted.step(put, 3)) == [PutAck("k", HOME, 1)]
    assert restarted.entry("k").data == '"dirty"'


# ---- the fault-injecting simulation --------------------------------------------------------


@pytest.mark.parametrize("seed", range(200))
def test_random_faulty_run_stays_coherent_and_live(seed):
    cluster = faulty_sim.run(seed)
    assert cluster.checker.reads + cluster.checker.writes > 0


def test_faulty_runs_exercise_the_faults_and_the_recoveries():
    totals: dict[str, int] = {}
    resent = unmatched = 0
    for seed in range(20):
        cluster = faulty_sim.run(seed)
        for what, n in cluster.counts.items():
            totals[what] = totals.get(what, 0) + n
        for c in cluster.caches.values():
            assert isinstance(c, RecoveringLineCache)
            resent += c.resent
            unmatched += c.unmatched
    assert {"lost", "duplicated", "home_restart", "cache_restart", "FwdGetM"} <= set(totals)
    assert resent > 0 and unmatched > 0


@pytest.mark.parametrize("seed", range(60))
def test_random_faulty_run_with_key_churn_stays_coherent_and_live(seed):
    cluster = faulty_sim.run(seed, churn=True)
    assert cluster.checker.reads + cluster.checker.writes > 0
    for home in cluster.dirs.values():  # settled: only keys with a value or a copy remain
        for entry in home.entries():
            assert entry.data is not None or entry.state is not DirState.I, entry


def test_churn_runs_retire_entries_and_bring_keys_back():
    retired = 0
    for seed in range(10):
        cluster = faulty_sim.run(seed, churn=True)
        retired += cluster.counts.get("retired", 0)
        assert all(d.retired_txn > 0 for d in cluster.dirs.values() if d.retired)
    assert retired > 50


def test_a_recovering_home_retires_an_unused_entry_and_restarts_from_its_floor():
    d = home()
    d.step(GetM("k", "o", 7), 0)
    d.step(Unblock("k", "o", 1), 0)
    out = d.step(PutM("k", "o", 1, 3, None), 0)  # o deleted k, then evicted it
    assert persisted(out) == {"": {"txn": "1", "version": "3"}, "k": None}
    assert list(d.entries()) == []
    restarted = home()
    restarted.restore("", persisted(out)[""], 0)
    out = restarted.step(GetM("k", "o", 7), 0)  # a late copy of o's old request
    assert messages(out) == [Data("k", HOME, 2, State.M, None, 3, 0, 7)]


def test_a_long_faulty_run_stays_coherent():
    faulty_sim.run(4242, steps=8_000)


class AcceptsAnyGrant(faulty_sim.RecoveringCache):
    """Broken: installs grants that answer no outstanding request."""

    def _on_data(self, msg, now, out):
        seen = self._seen(msg.key)
        if seen is not None and msg.txn <= seen:
            RecoveringLineCache._on_data(self, msg, now, out)
        else:
            LineCache._on_data(self, msg, now, out)


class NoHandoffRecords(faulty_sim.RecoveringCache):
    """Broken: answers forwards as the base cache does, keeping no record."""

    def _on_fwd(self, msg, now, out):
        LineCache._on_fwd(self, msg, now, out)


class NoFloors(faulty_sim.RecoveringCache):
    """Broken: forgets a removed line's txn."""

    def _forget(self, key, txn):
        pass


class ForwardNotPersisted(faulty_sim.RecoveringDir):
    """Broken: a restarted home forgets the forward it was waiting on."""

    def _actions(self, out):
        return Directory._actions(self, out)


class SharedGrantsUnblocked(faulty_sim.RecoveringCache):
    """Broken: a shared grant is trusted even when an Inv of a later transaction got
    here first (the Inv leaves no floor)."""

    def _on_inv(self, msg, out):
        LineCache._on_inv(self, msg, out)


class RetiresWithoutFloor(faulty_sim.RecoveringDir):
    """Broken: a key whose entry was retired starts again from txn 0 and version 0."""

    def _fresh(self, key):
        return DirEntry(key)


class RetiresWithoutTxnFloor(faulty_sim.RecoveringDir):
    """Broken: a retired key's versions keep growing, but its txns start again from 0."""

    def _fresh(self, key):
        return DirEntry(key, version=self.retired_version)


class RetiresWithoutVersionFloor(faulty_sim.RecoveringDir):
    """Broken: a retired key's txns keep growing, but its versions start again from 0."""

    def _fresh(self, key):
        return DirEntry(key, txn=self.retired_txn)


@pytest.mark.parametrize(
    "broken",
    [
        {"cache_class": AcceptsAnyGrant},
        {"cache_class": NoHandoffRecords},
        {"cache_class": NoFloors},
        {"cache_class": SharedGrantsUnblocked},
        {"directory_class": ForwardNotPersisted},
        {"directory_class": RetiresWithoutFloor, "churn": True},
        {"directory_class": RetiresWithoutTxnFloor, "churn": True},
        {"directory_class": RetiresWithoutVersionFloor, "churn": True},
    ],
    ids=[
        "accepts-any-grant",
        "no-handoff-records",
        "no-floors",
        "inv-leaves-no-floor",
        "forward-not-persisted",
        "retires-without-floor",
        "retires-without-txn-floor",
        "retires-without-version-floor",
    ],
)
def test_the_faulty_simulation_catches_a_missing_recovery(broken):
    for seed in range(300):  # (a floor-less Inv first breaks coherence at seed 132)
        try:
            faulty_sim.run(seed, **broken)
        except (SimFailure, AssertionError) as failure:
            assert f"seed={seed}" in str(failure)
            return
    pytest.fail("300 seeds ran clean without a recovery extension")
