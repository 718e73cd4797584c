"""LineCache: one test per (state, event) transition of the node's side of MESI, plus
capacity, eviction policy, action ordering and the Redis hash mirror."""

from __future__ import annotations

import pytest

from service.cache import (
    Data,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    Inv,
    InvAck,
    Line,
    LineCache,
    LocalDelete,
    LocalRead,
    LocalWrite,
    PersistLine,
    PutAck,
    PutE,
    PutM,
    PutS,
    ReadDone,
    Send,
    State,
    Unblock,
    WriteDone,
)

from .util import messages, persisted, replies

NODE, HOME, PEER = "n1", "h", "n2"
LEASE = 100


def new_cache(**kw) -> LineCache:
    return LineCache(NODE, lambda key: HOME, **kw)


def grant(c: LineCache, key: str, state: State, data='"v"', version=1, txn=1, now=0):
    return c.step(Data(key, HOME, txn, state, data, version, LEASE), now)


def holding(state: State, key="k", data='"v"', version=1, txn=1, now=0, **kw) -> LineCache:
    """A cache holding `key` in `state`, reached through the protocol."""
    c = new_cache(**kw)
    if state is State.S:
        c.step(LocalRead(0, key), now)
        grant(c, key, State.S, data, version, txn, now)
    elif state is State.I:
        grant(c, key, State.E, data, version, txn - 1 if txn > 1 else 0, now)
        c.step(Inv(key, HOME, txn), now)
    else:
        grant(c, key, state, data, version, txn, now)
    assert c.state(key, now) is state
    return c


# ---- local read --------------------------------------------------------------------------


def test_read_miss_on_a_line_never_seen_asks_the_home():
    c = new_cache()
    assert c.step(LocalRead(1, "k"), 0) == [Send(HOME, GetS("k", NODE))]
    assert c.misses == 1


@pytest.mark.parametrize("state", [State.M, State.E, State.S])
def test_read_hit_on_a_valid_line_returns_the_value_with_no_actions(state):
    c = holding(state, data='{"a":1}', version=4)
    [done] = c.step(LocalRead(7, "k"), 10)
    assert done == ReadDone(7, "k", True, {"a": 1}, '{"a":1}', 4, state, hit=True)


def test_read_on_an_invalid_line_is_a_miss():
    c = holding(State.I, txn=2)
    assert messages(c.step(LocalRead(1, "k"), 0)) == [GetS("k", NODE)]


def test_read_on_an_s_line_past_its_lease_is_a_miss():
    c = holding(State.S, now=0)  # lease counted from the GetS sent at 0
    assert c.step(LocalRead(1, "k"), LEASE - 1)[0] == ReadDone(
        1, "k", True, "v", '"v"', 1, State.S, hit=True
    )
    assert c.state("k", LEASE) is State.I
    assert messages(c.step(LocalRead(2, "k"), LEASE)) == [GetS("k", NODE)]


def test_reads_queue_behind_one_outstanding_request():
    c = new_cache()
    c.step(LocalRead(1, "k"), 0)
    assert c.step(LocalRead(2, "k"), 0) == []
    out = grant(c, "k", State.S)
    assert [r.op for r in replies(out)] == [1, 2]
    assert all(not r.hit for r in replies(out))


def test_read_of_an_absent_key_reports_not_found():
    c = new_cache()
    c.step(LocalRead(1, "k"), 0)
    [done] = replies(grant(c, "k", State.E, data=None, version=0))
    assert (done.found, done.value, done.data, done.version) == (False, None, None, 0)


# ---- local write -------------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.I, State.S])
def test_write_without_ownership_asks_the_home_for_m(state):
    c = holding(state, txn=2)
    assert messages(c.step(LocalWrite(1, "k", "x"), 0)) == [GetM("k", NODE)]


def test_write_on_a_line_never_seen_asks_for_m():
    assert new_cache().step(LocalWrite(1, "k", 5), 0) == [Send(HOME, GetM("k", NODE))]


def test_write_on_e_upgrades_silently_to_m_and_bumps_the_version():
    c = holding(State.E, version=3)
    out = c.step(LocalWrite(1, "k", [1, 2]), 0)
    assert out == [
        PersistLine(NODE, "k", {"state": "M", "version": "4", "txn": "1", "value": "[1,2]"}),
        WriteDone(1, "k", 4),
    ]
    assert c.state("k", 0) is State.M


def test_write_on_m_bumps_the_version_each_time():
    c = holding(State.M, version=3)
    c.step(LocalWrite(1, "k", "a"), 0)
    assert replies(c.step(LocalWrite(2, "k", "b"), 0)) == [WriteDone(2, "k", 5)]
    assert c.line("k") == Line("k", State.M, '"b"', 5, 1)


def test_delete_is_a_write_of_absence():
    c = holding(State.M, version=3)
    assert replies(c.step(LocalDelete(1, "k"), 0)) == [WriteDone(1, "k", 4)]
    [read] = c.step(LocalRead(2, "k"), 0)
    assert (read.found, read.version) == (False, 4)


def test_write_of_a_non_json_value_is_refused_before_any_change():
    c = holding(State.M)
    with pytest.raises(ValueError, match="JSON"):
        c.step(LocalWrite(1, "k", float("nan")), 0)
    assert c.line("k") == Line("k", State.M, '"v"', 1, 1)


def test_writes_queued_behind_a_read_keep_their_order():
    c = new_cache()
    c.step(LocalRead(1, "k"), 0)
    c.step(LocalWrite(2, "k", "x"), 0)
    c.step(LocalRead(3, "k"), 0)
    out = grant(c, "k", State.S, version=1, txn=1)
    assert [r.op for r in replies(out)] == [1]  # the write needs M: ask for it next
    assert messages(out) == [Unblock("k", NODE, 1), GetM("k", NODE)]
    out = grant(c, "k", State.M, version=1, txn=2)
    assert replies(out) == [
        WriteDone(2, "k", 2),
        ReadDone(3, "k", True, "x", '"x"', 2, State.M, hit=False),
    ]


# ---- Data (the grant) --------------------------------------------------------------------


def test_data_s_installs_a_lease_counted_from_when_getS_was_sent():
    c = new_cache()
    c.step(LocalRead(1, "k"), 10)
    out = grant(c, "k", State.S, now=50)
    assert out == [
        PersistLine(NODE, "k", {"state": "S", "version": "1", "txn": "1", "value": '"v"'}),
        Send(HOME, Unblock("k", NODE, 1)),
        ReadDone(1, "k", True, "v", '"v"', 1, State.S, hit=False),
    ]
    assert c.line("k").lease_until == 10 + LEASE


def test_data_m_upgrades_a_shared_line():
    c = holding(State.S, version=2, txn=1)
    assert messages(c.step(LocalWrite(1, "k", "w"), 0)) == [GetM("k", NODE)]
    out = grant(c, "k", State.M, version=2, txn=2)
    assert replies(out) == [WriteDone(1, "k", 3)]
    assert c.line("k") == Line("k", State.M, '"w"', 3, 2)


def test_an_older_s_grant_does_not_answer_an_outstanding_getm():
    c = new_cache()
    c.step(LocalWrite(1, "k", "w"), 0)
    out = grant(c, "k", State.S)  # e.g. for a GetS sent before a restart
    assert messages(out) == [Unblock("k", NODE, 1)]  # no second GetM: ours is pending
    assert replies(grant(c, "k", State.M, txn=2)) == [WriteDone(1, "k", 2)]


def test_data_e_is_exclusive_and_clean():
    c = new_cache()
    c.step(LocalRead(1, "k"), 0)
    grant(c, "k", State.E, version=2)
    assert c.line("k") == Line("k", State.E, '"v"', 2, 1)


def test_data_m_applies_the_queued_write():
    c = new_cache()
    c.step(LocalWrite(1, "k", "new"), 0)
    out = grant(c, "k", State.M, version=6)
    assert replies(out) == [WriteDone(1, "k", 7)]
    assert persisted(out)["k"]["value"] == '"new"'


def test_queued_reads_are_served_by_their_grant_even_if_its_lease_is_over():
    c = new_cache()
    c.step(LocalRead(1, "k"), 0)
    out = grant(c, "k", State.S, now=LEASE + 5)  # arrived after the lease it carries
    assert [r.op for r in replies(out)] == [1]
    assert c.state("k", LEASE + 5) is State.I
    assert messages(c.step(LocalRead(2, "k"), LEASE + 5)) == [GetS("k", NODE)]


def test_stale_reply_with_an_older_txn_is_discarded():
    c = holding(State.S, version=5, txn=7)
    assert grant(c, "k", State.S, version=5, txn=6) == []
    assert grant(c, "k", State.M, version=9, txn=7) == []
    assert c.line("k").txn == 7 and c.stale_dropped == 2


def test_grant_carrying_an_older_value_than_ours_keeps_ours_but_is_acknowledged():
    c = holding(State.M, version=9, txn=4)
    out = grant(c, "k", State.M, data='"old"', version=6, txn=5)
    assert messages(out) == [Unblock("k", NODE, 5)]
    assert c.line("k") == Line("k", State.M, '"v"', 9, 5)


def test_unrequested_s_grant_arrives_already_expired():
    c = new_cache()  # e.g. we restarted after sending GetS
    out = grant(c, "k", State.S, now=30)
    assert messages(out) == [Unblock("k", NODE, 1)]
    assert c.state("k", 30) is State.I


def test_grant_crossing_our_eviction_takes_the_buffer_back():
    c = holding(State.M, key="a", version=3, max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    grant(c, "b", State.E)  # evicts a: PutM in flight
    assert c.line("a").evicting
    out = c.step(Data("a", HOME, 2, State.M, '"old"', 1), 0)  # a late re-grant of a
    assert Unblock("a", NODE, 2) in messages(out)
    assert c.line("a") == Line("a", State.M, '"v"', 3, 2)


# ---- Inv ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.S, State.E])
def test_inv_on_a_clean_line_invalidates_and_acks_without_data(state):
    c = holding(state, version=2, txn=1)
    out = c.step(Inv("k", HOME, 3), 0)
    assert out == [
        PersistLine(NODE, "k", {"state": "I", "version": "2", "txn": "3"}),
        Send(HOME, InvAck("k", NODE, 3)),
    ]
    assert c.state("k", 0) is State.I


def test_inv_on_m_acks_with_the_dirty_value():
    c = holding(State.M, data='"d"', version=8)
    assert messages(c.step(Inv("k", HOME, 3), 0)) == [InvAck("k", NODE, 3, True, '"d"', 8)]


@pytest.mark.parametrize("state", [None, State.I])
def test_inv_for_a_copy_we_do_not_hold_is_still_acked(state):
    c = new_cache() if state is None else holding(state, txn=2)
    assert messages(c.step(Inv("k", HOME, 3), 0)) == [InvAck("k", NODE, 3)]


def test_inv_older_than_our_grant_is_discarded():
    c = holding(State.S, txn=5)
    assert c.step(Inv("k", HOME, 4), 0) == []
    assert c.state("k", 0) is State.S


def test_inv_while_evicting_acks_and_keeps_the_buffer():
    c = evicting(State.M)
    assert messages(c.step(Inv("a", HOME, 2), 0)) == [InvAck("a", NODE, 2)]
    assert c.line("a").evicting


# ---- Fwd-GetS / Fwd-GetM -----------------------------------------------------------------


@pytest.mark.parametrize("state", [State.M, State.E])
def test_fwd_gets_downgrades_the_owner_and_sends_data_both_ways(state):
    c = holding(state, data='"d"', version=4, txn=1)
    out = c.step(FwdGetS("k", HOME, 2, PEER, LEASE), 20)
    assert out == [
        PersistLine(NODE, "k", {"state": "S", "version": "4", "txn": "2", "value": '"d"'}),
        Send(PEER, Data("k", NODE, 2, State.S, '"d"', 4, LEASE)),
        Send(HOME, FwdDone("k", NODE, 2, True, '"d"', 4, kept=True)),
    ]
    assert c.line("k").lease_until == 20 + LEASE


@pytest.mark.parametrize("state", [State.M, State.E])
def test_fwd_getm_invalidates_the_owner_and_hands_over_the_data(state):
    c = holding(state, data='"d"', version=4, txn=1)
    out = c.step(FwdGetM("k", HOME, 2, PEER), 0)
    assert messages(out) == [
        Data("k", NODE, 2, State.M, '"d"', 4),
        FwdDone("k", NODE, 2, True, '"d"', 4, kept=False),
    ]
    assert c.line("k") == Line("k", State.I, None, 4, 2)


def test_fwd_to_a_node_with_nothing_left_says_so():
    c = new_cache()
    assert messages(c.step(FwdGetM("k", HOME, 2, PEER), 0)) == [
        FwdDone("k", NODE, 2, has_data=False)
    ]


@pytest.mark.parametrize(
    ("fwd", "after"),
    [(FwdGetS("k", HOME, 2, PEER, LEASE), State.S), (FwdGetM("k", HOME, 2, PEER), State.I)],
)
def test_fwd_to_an_s_line_hands_over_its_value(fwd, after):
    # After a home restart that lost a FwdDone, the home may still think we own it.
    c = holding(State.S, version=4)
    out = c.step(fwd, 0)
    assert FwdDone("k", NODE, 2, True, '"v"', 4, kept=after is State.S) in messages(out)
    assert c.state("k", 0) is after


def test_fwd_older_than_our_grant_is_discarded():
    c = holding(State.M, txn=5)
    assert c.step(FwdGetS("k", HOME, 4, PEER, LEASE), 0) == []
    assert c.step(FwdGetM("k", HOME, 5, PEER), 0) != []  # same txn: not stale


@pytest.mark.parametrize("fwd", [FwdGetS("a", HOME, 2, PEER, LEASE), FwdGetM("a", HOME, 2, PEER)])
def test_fwd_is_answered_from_the_eviction_buffer(fwd):
    c = evicting(State.M)
    c.step(LocalRead(9, "a"), 0)  # stalls on the eviction
    out = c.step(fwd, 0)
    assert messages(out) == [
        Data(
            "a",
            NODE,
            2,
            State.S if isinstance(fwd, FwdGetS) else State.M,
            '"v"',
            3,
            fwd.lease_ms if isinstance(fwd, FwdGetS) else 0,
        ),
        FwdDone("a", NODE, 2, True, '"v"', 3, kept=False),
        GetS("a", NODE),  # the stalled read may go ahead now
    ]
    assert c.line("a") is None


# ---- eviction and PutAck -----------------------------------------------------------------


def evicting(state: State) -> LineCache:
    """A cache whose line 'a' (version 3, txn 1) was just evicted from `state`."""
    c = holding(state, key="a", version=3, max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    grant(c, "b", State.E)
    return c


def test_evicting_m_writes_back_and_keeps_a_buffer():
    c = holding(State.M, key="a", version=3, max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    out = grant(c, "b", State.E)
    assert Send(HOME, PutM("a", NODE, 1, 3, '"v"')) in out
    assert persisted(out)["a"] == {
        "state": "M",
        "version": "3",
        "txn": "1",
        "value": '"v"',
        "evicting": "1",
    }
    assert c.state("a", 0) is State.I and c.line("a").evicting


def test_evicting_e_sends_a_notice_and_keeps_a_buffer():
    c = holding(State.E, key="a", version=3, max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    assert PutE("a", NODE, 1, 3) in messages(grant(c, "b", State.E))
    assert c.line("a").evicting


def test_evicting_s_sends_puts_and_forgets_the_line():
    c = holding(State.S, key="a", max_entries=1)
    c.step(LocalRead(1, "b"), 0)
    out = grant(c, "b", State.E, txn=2)
    assert PutS("a", NODE, 1) in messages(out)
    assert persisted(out)["a"] is None and c.line("a") is None


def test_invalid_lines_are_evicted_first_and_silently():
    c = holding(State.M, key="a", max_entries=2)
    c.step(Data("b", HOME, 1, State.E, '"b"', 1), 0)
    c.step(Inv("b", HOME, 2), 0)  # b is I now, and more recent than a
    out = c.step(Data("c", HOME, 1, State.E, '"c"', 1), 0)
    assert messages(out) == [Unblock("c", NODE, 1)]
    assert c.line("b") is None and c.state("a", 0) is State.M


def test_ops_on_an_evicting_key_wait_for_the_put_ack():
    c = evicting(State.M)
    assert c.step(LocalRead(5, "a"), 0) == []
    out = c.step(PutAck("a", HOME, 1), 0)
    assert out == [PersistLine(NODE, "a", None), Send(HOME, GetS("a", NODE))]


def test_stale_put_ack_is_ignored():
    c = evicting(State.E)
    assert c.step(PutAck("a", HOME, 7), 0) == []
    assert c.line("a").evicting


def test_byte_capacity_counts_json_size():
    c = new_cache(max_bytes=10)
    c.step(Data("a", HOME, 1, State.E, '"12345"', 1), 0)  # 7 bytes
    out = c.step(Data("b", HOME, 1, State.E, '"678"', 1), 0)  # 5 more: over 10
    assert PutE("a", NODE, 1, 1) in messages(out)
    assert c.stats(0).bytes == 5


def test_a_value_larger_than_the_cache_is_written_then_written_back():
    c = new_cache(max_bytes=4)
    c.step(LocalWrite(1, "k", "too long"), 0)
    out = grant(c, "k", State.M, data=None, version=0)
    assert WriteDone(1, "k", 1) in out
    assert PutM("k", NODE, 1, 1, '"too long"') in messages(out)


@pytest.mark.parametrize(("policy", "victim"), [("lru", "a"), ("lfu", "b")])
def test_eviction_policy_picks_the_victim(policy, victim):
    c = new_cache(max_entries=2, policy=policy)
    c.step(Data("a", HOME, 1, State.E, "1", 1), 0)
    c.step(Data("b", HOME, 1, State.E, "2", 1), 0)
    for op in range(3):
        c.step(LocalRead(op, "a"), 0)  # a: often used...
    c.step(LocalRead(9, "b"), 0)  # ...b: used last
    c.step(LocalRead(10, "a"), 0)
    c.step(LocalRead(11, "b"), 0)
    out = c.step(Data("c", HOME, 1, State.E, "3", 1), 0)
    assert PutE(victim, NODE, 1, 1) in messages(out)


# ---- action order, stats -----------------------------------------------------------------


def test_actions_are_ordered_persist_then_send_then_reply():
    c = new_cache(max_entries=1)
    c.step(Data("a", HOME, 1, State.M, '"a"', 1), 0)
    c.step(LocalWrite(1, "b", "x"), 0)
    out = grant(c, "b", State.M, version=1)
    kinds = [type(a).__name__ for a in out]
    assert kinds == ["PersistLine", "PersistLine", "Send", "Send", "WriteDone"]


def test_stats_count_states_hits_and_misses():
    c = holding(State.S, key="a", now=0, max_entries=5)
    c.step(Data("b", HOME, 1, State.M, '"b"', 1), 0)
    c.step(LocalRead(1, "b"), 0)
    stats = c.stats(0)
    assert stats.by_state == {"M": 1, "E": 0, "S": 1, "I": 0}
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 2)
    assert stats.hit_ratio == 0.5
    assert c.stats(LEASE).by_state["S"] == 0  # an expired lease counts as I


# ---- Redis hash mirror and the restart rule ----------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        Line("k", State.M, '{"x":[1,null]}', 7, 3),
        Line("k", State.E, "null", 2, 1),
        Line("k", State.M, None, 4, 2),  # deleted key, dirty
        Line("k", State.M, '"v"', 4, 2, evicting=True),
        Line("k", State.E, '"v"', 4, 2, evicting=True),
        Line("k", State.I, None, 9, 5),
    ],
)
def test_hash_round_trip(line):
    fields = line.to_hash()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert Line.from_hash("k", fields) == line


def test_json_null_and_absence_stay_distinct():
    assert Line("k", State.E, "null", 1, 1).to_hash()["value"] == "null"
    assert "value" not in Line("k", State.E, None, 1, 1).to_hash()


def test_s_line_reloads_as_i_keeping_version_and_txn():
    fields = Line("k", State.S, '"v"', 5, 3, lease_until=10**9).to_hash()
    assert Line.from_hash("k", fields) == Line("k", State.I, None, 5, 3)


def test_restarted_cache_serves_owned_lines_and_revalidates_shared_ones():
    before = holding(State.S, key="s", max_entries=5)
    before.step(Data("m", HOME, 1, State.M, '"m"', 3), 0)
    after = new_cache()
    for line in before.lines():
        after.restore(line.key, line.to_hash())
    assert after.step(LocalRead(1, "m"), 0)[0].hit
    assert messages(after.step(LocalRead(2, "s"), 0)) == [GetS("s", NODE)]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"state": "X", "version": "1", "txn": "1"},
        {"state": "M", "version": "one", "txn": "1"},
        {"state": "M", "version": "1", "txn": "1", "value": "{not json"},
        {"state": "S", "version": "1", "txn": "1", "evicting": "1"},
        {"state": "M", "version": "-1", "txn": "1"},
    ],
)
def test_malformed_hash_is_refused_naming_the_key(fields):
    with pytest.raises(ValueError, match="'k'"):
        Line.from_hash("k", fields)


def test_capacity_and_policy_are_validated():
    with pytest.raises(ValueError):
        new_cache(max_entries=0)
    with pytest.raises(ValueError, match="policy"):
        new_cache(policy="fifo")
