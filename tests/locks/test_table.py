"""One test per rule of the lock table (service/locks/table.py), in spec order."""

from __future__ import annotations

import pytest

from service.locks.codec import invariant_violations
from service.locks.table import (
    CancelOutcome,
    Deadlock,
    Due,
    Granted,
    Held,
    Hold,
    LockTable,
    Mode,
    ModeConflict,
    Queued,
    ReleaseOutcome,
    WaitDropped,
    compatible,
)

X = Mode.EXCLUSIVE
S = Mode.SHARED


class T:
    """A LockTable fed with strictly increasing log indexes and a settable clock."""

    def __init__(self, max_tombstones: int = 100) -> None:
        self.t = LockTable(max_tombstones)
        self.index = 0
        self.now = 0

    def next(self) -> int:
        self.index += 1
        return self.index

    def acq(self, name, owner, mode=X, ttl=1000, wait=False, wait_ms=0):
        return self.t.acquire(self.next(), self.now, name, owner, mode, ttl, wait, wait_ms)

    def wait(self, name, owner, mode=X, ttl=1000, wait_ms=0):
        out = self.acq(name, owner, mode, ttl, True, wait_ms)
        assert isinstance(out, Queued), out
        return out

    def grant(self, name, owner, mode=X, ttl=1000):
        out = self.acq(name, owner, mode, ttl)
        assert isinstance(out, Granted), out
        return out

    def rel(self, name, owner, token):
        return self.t.release(self.next(), self.now, name, owner, token)

    def expire(self, name, owner, token):
        return self.t.expire(self.next(), self.now, name, owner, token)

    def cancel(self, name, owner, seq=None):
        return self.t.cancel_wait(self.next(), self.now, name, owner, seq)

    def expire_wait(self, name, owner, seq):
        return self.t.expire_wait(self.next(), self.now, name, owner, seq)

    def keepalive(self, name, owner, token, ttl=None):
        self.next()
        return self.t.keepalive(self.now, name, owner, token, ttl)

    def holders(self, name):
        view = self.t.get(name)
        return [] if view is None else [(h.owner, h.mode) for h in view.holders]

    def waiters(self, name):
        view = self.t.get(name)
        return [] if view is None else [(w.owner, w.mode) for w in view.waiters]

    def granted_events(self):
        return [(e.owner, e.token) for e in self.t.take_events() if isinstance(e, Granted)]

    def check(self):
        for name in self.t.names():
            state = self.t.state(name)
            assert state is not None
            assert invariant_violations(state) == []


@pytest.fixture
def t() -> T:
    return T()


# --- modes -------------------------------------------------------------------------


def test_a_lock_is_held_by_one_exclusive_holder(t):
    t.grant("L", "a")
    assert isinstance(t.acq("L", "b"), Held)
    assert t.holders("L") == [("a", X)]


def test_a_lock_is_held_by_any_number_of_shared_holders(t):
    for owner in "abcd":
        t.grant("L", owner, S)
    assert t.holders("L") == [("a", S), ("b", S), ("c", S), ("d", S)]


def test_shared_is_refused_while_exclusive_is_held_and_vice_versa(t):
    t.grant("L", "a", X)
    assert isinstance(t.acq("L", "b", S), Held)
    t.grant("M", "a", S)
    assert isinstance(t.acq("M", "b", X), Held)
    t.check()


def test_a_try_lock_that_loses_is_not_enqueued(t):
    t.grant("L", "a")
    assert isinstance(t.acq("L", "b", wait=False), Held)
    assert t.waiters("L") == []


# --- FIFO ----------------------------------------------------------------------------


def test_waiters_are_granted_in_arrival_order(t):
    g = t.grant("L", "a")
    for owner in "bcd":
        t.wait("L", owner)
    assert t.rel("L", "a", g.token) is ReleaseOutcome.RELEASED
    assert t.holders("L") == [("b", X)]
    assert t.waiters("L") == [("c", X), ("d", X)]


def test_a_compatible_request_waits_if_anyone_waits_ahead(t):
    # No writer starvation: shared readers keep arriving, but the exclusive waiter
    # ahead of them makes them queue behind it.
    t.grant("L", "r1", S)
    t.wait("L", "w", X)
    queued = t.acq("L", "r2", S, wait=True)
    assert isinstance(queued, Queued) and queued.position == 2
    assert isinstance(t.acq("L", "r3", S, wait=False), Held)


def test_release_grants_one_exclusive_waiter_from_the_head(t):
    g = t.grant("L", "a", S)
    t.wait("L", "x", X)
    t.wait("L", "s", S)
    t.rel("L", "a", g.token)
    assert t.holders("L") == [("x", X)]
    assert t.waiters("L") == [("s", S)]


def test_release_grants_the_run_of_shared_waiters_at_the_head(t):
    g = t.grant("L", "a", X)
    t.wait("L", "s1", S)
    t.wait("L", "s2", S)
    t.wait("L", "x", X)
    t.wait("L", "s3", S)
    t.rel("L", "a", g.token)
    assert t.holders("L") == [("s1", S), ("s2", S)]
    assert t.waiters("L") == [("x", X), ("s3", S)]
    assert t.granted_events() == [("s1", t.index), ("s2", t.index)]


def test_one_shared_holder_leaving_does_not_grant_an_exclusive_waiter(t):
    a = t.grant("L", "a", S)
    t.grant("L", "b", S)
    t.wait("L", "x", X)
    t.rel("L", "a", a.token)
    assert t.holders("L") == [("b", S)]
    assert t.waiters("L") == [("x", X)]


# --- re-acquire and mode conflicts ----------------------------------------------------


def test_reacquiring_returns_the_current_grant_unchanged(t):
    g = t.grant("L", "a", X, ttl=1000)
    t.now = 500
    again = t.acq("L", "a", X, ttl=5000)
    assert again == g  # same token, same expiry: nothing refreshed


def test_asking_for_another_mode_while_holding_is_a_mode_conflict(t):
    t.grant("L", "a", S)
    out = t.acq("L", "a", X, wait=True)
    assert out == ModeConflict("L", "a", S, X, waiting=False)
    assert t.waiters("L") == []


def test_asking_again_while_waiting_returns_the_same_place_in_the_queue(t):
    t.grant("L", "a")
    first = t.wait("L", "b")
    t.wait("L", "c")
    again = t.acq("L", "b", X, wait=True)
    assert again == first
    assert isinstance(t.acq("L", "b", S, wait=True), ModeConflict)
    assert t.waiters("L") == [("b", X), ("c", X)]


# --- fencing tokens -------------------------------------------------------------------


def test_the_token_is_the_log_index_of_the_granting_acquire(t):
    t.next()
    t.next()
    g = t.grant("L", "a")
    assert g.token == t.index == 3


def test_a_waiter_granted_later_gets_the_index_of_the_release(t):
    g = t.grant("L", "a")
    t.wait("L", "b")
    t.rel("L", "a", g.token)
    assert t.granted_events() == [("b", t.index)]
    assert t.t.get("L").last_token == t.index


def test_a_waiter_granted_by_an_expiry_gets_the_index_of_the_expiry(t):
    g = t.grant("L", "a", ttl=10)
    t.wait("L", "b")
    t.now = 10
    assert t.expire("L", "a", g.token)
    assert t.granted_events() == [("b", t.index)]


def test_successive_exclusive_tokens_strictly_increase_even_after_the_lock_was_free(t):
    tokens = []
    for owner in "abc":
        g = t.grant("L", owner)
        tokens.append(g.token)
        t.rel("L", owner, g.token)
        assert t.t.get("L").last_token == g.token  # kept while free
    assert tokens == sorted(set(tokens))


def test_tokens_increase_even_when_the_free_lock_was_forgotten():
    t = T(max_tombstones=0)
    g = t.grant("L", "a")
    t.rel("L", "a", g.token)
    assert t.t.get("L") is None  # forgotten at once
    assert t.grant("L", "b").token > g.token


def test_shared_waiters_granted_by_one_command_share_its_token(t):
    g = t.grant("L", "x")
    t.wait("L", "s1", S)
    t.wait("L", "s2", S)
    t.rel("L", "x", g.token)
    assert {h.token for h in t.t.get("L").holders} == {t.index}


def test_oldest_free_locks_are_forgotten_beyond_the_bound():
    t = T(max_tombstones=2)
    for name in "ABC":
        g = t.grant(name, "a")
        t.rel(name, "a", g.token)
    assert t.t.get("A") is None
    assert t.t.get("B") is not None and t.t.get("C") is not None
    assert "A" in t.t.take_dirty()


# --- leases -------------------------------------------------------------------------


def test_a_hold_expires_ttl_after_the_commands_clock(t):
    t.now = 1_000
    assert t.grant("L", "a", ttl=250).expires_at_ms == 1_250


def test_keepalive_extends_from_now_with_the_new_ttl(t):
    g = t.grant("L", "a", ttl=100)
    t.now = 80
    kept = t.keepalive("L", "a", g.token, ttl=300)
    assert kept is not None and kept.expires_at_ms == 380 and kept.ttl_ms == 300
    assert t.keepalive("L", "a", g.token).expires_at_ms == 380  # keeps ttl 300


def test_keepalive_of_a_lost_or_stale_hold_is_refused(t):
    g = t.grant("L", "a")
    assert t.keepalive("L", "a", g.token + 1) is None
    assert t.keepalive("L", "b", g.token) is None
    assert t.keepalive("nope", "a", g.token) is None


def test_expire_ends_a_hold_whose_lease_ran_out(t):
    g = t.grant("L", "a", ttl=100)
    t.now = 100
    assert t.t.expired(100) == [Due("L", "a", g.token, 100)]
    assert t.expire("L", "a", g.token)
    assert t.holders("L") == []
    assert t.t.expired(100) == []


def test_expire_is_a_noop_if_the_lease_has_not_run_out_as_of_the_command(t):
    g = t.grant("L", "a", ttl=100)
    t.now = 99
    assert not t.expire("L", "a", g.token)
    assert t.holders("L") == [("a", X)]


def test_expire_is_a_noop_if_the_hold_was_kept_alive_meanwhile(t):
    g = t.grant("L", "a", ttl=100)
    t.now = 100
    due = t.t.expired(100)
    t.keepalive("L", "a", g.token)  # applied before the leader's expire
    assert not t.expire(due[0].name, due[0].owner, due[0].ident)
    assert t.holders("L") == [("a", X)]


def test_expire_is_a_noop_if_the_lock_was_regranted_with_another_token(t):
    g = t.grant("L", "a", ttl=100)
    t.rel("L", "a", g.token)
    t.grant("L", "a", ttl=100)
    t.now = 1_000
    assert not t.expire("L", "a", g.token)
    assert t.holders("L") == [("a", X)]


def test_leader_change_gives_every_lease_and_wait_a_full_budget(t):
    t.now = 5_000_000  # old leader's clock
    g = t.grant("L", "a", ttl=100)
    t.wait("L", "b", ttl=200, wait_ms=50)
    t.now = 7  # the new leader's clock has another origin
    assert t.t.leader_change(7) == (1, 1)
    view = t.t.get("L")
    assert view.holders[0].expires_at_ms == 107
    assert view.waiters[0].deadline_ms == 57
    assert t.t.expired(106) == [] and t.t.expired(107) == [Due("L", "a", g.token, 107)]


# --- waiters ------------------------------------------------------------------------


def test_a_waiter_has_a_deadline_of_its_wait_budget_or_else_its_ttl(t):
    t.grant("L", "a")
    t.now = 10
    assert t.wait("L", "b", ttl=300, wait_ms=40).deadline_ms == 50
    assert t.wait("L", "c", ttl=300).deadline_ms == 310


def test_a_cancelled_waiter_is_never_granted(t):
    g = t.grant("L", "a")
    b = t.wait("L", "b")
    t.wait("L", "c")
    assert t.cancel("L", "b") is CancelOutcome.CANCELLED
    t.rel("L", "a", g.token)
    assert t.holders("L") == [("c", X)]
    events = t.t.take_events()
    assert events[0] == WaitDropped("L", "b", b.seq, "cancelled")
    assert [e.owner for e in events if isinstance(e, Granted)] == ["c"]


def test_cancelling_the_head_grants_what_became_grantable(t):
    t.grant("L", "r", S)
    t.wait("L", "x", X)
    t.wait("L", "s", S)
    t.cancel("L", "x")
    assert t.holders("L") == [("r", S), ("s", S)]
    assert t.granted_events() == [("s", t.index)]


def test_cancel_after_the_grant_returns_the_grant(t):
    g = t.grant("L", "a")
    t.wait("L", "b")
    t.rel("L", "a", g.token)
    out = t.cancel("L", "b")
    assert isinstance(out, Granted) and out.owner == "b"
    assert t.cancel("L", "zed") is CancelOutcome.NOT_WAITING


def test_a_late_cancel_with_an_old_seq_keeps_the_newer_wait(t):
    t.grant("L", "a")
    old = t.wait("L", "b")
    t.cancel("L", "b")
    new = t.wait("L", "b")
    assert t.cancel("L", "b", seq=old.seq) is CancelOutcome.NOT_WAITING
    assert t.waiters("L") == [("b", X)] and new.seq != old.seq


def test_a_wait_past_its_deadline_can_be_expired_by_the_leader(t):
    t.grant("L", "a", ttl=10_000)
    q = t.wait("L", "b", wait_ms=100)
    assert t.t.expired_waits(99) == []
    assert t.t.expired_waits(100) == [Due("L", "b", q.seq, 100)]
    t.now = 99
    assert not t.expire_wait("L", "b", q.seq)  # not yet, as of the command's clock
    t.now = 100
    assert not t.expire_wait("L", "b", q.seq + 1)  # another wait
    assert t.expire_wait("L", "b", q.seq)
    assert t.waiters("L") == []
    assert t.t.take_events()[-1] == WaitDropped("L", "b", q.seq, "expired")


# --- release ------------------------------------------------------------------------


def test_release_checks_owner_and_token(t):
    g = t.grant("L", "a")
    assert t.rel("L", "b", g.token) is ReleaseOutcome.NOT_HELD
    assert t.rel("M", "a", g.token) is ReleaseOutcome.NOT_HELD
    assert t.rel("L", "a", g.token - 1) is ReleaseOutcome.STALE_TOKEN
    assert t.rel("L", "a", g.token) is ReleaseOutcome.RELEASED
    assert t.rel("L", "a", g.token) is ReleaseOutcome.NOT_HELD


def test_a_waiter_cannot_release_its_wait(t):
    t.grant("L", "a")
    q = t.wait("L", "b")
    assert t.rel("L", "b", q.seq) is ReleaseOutcome.NOT_HELD
    assert t.waiters("L") == [("b", X)]


# --- events and queries -------------------------------------------------------------


def test_immediate_grants_are_results_not_events(t):
    t.grant("L", "a")
    assert t.t.take_events() == []


def test_events_are_drained_once(t):
    g = t.grant("L", "a")
    t.wait("L", "b")
    t.rel("L", "a", g.token)
    assert len(t.t.take_events()) == 1
    assert t.t.take_events() == []


def test_get_lists_holders_by_token_and_waiters_in_fifo_order(t):
    t.grant("L", "z", S)
    t.grant("L", "a", S)
    t.wait("L", "m", X)
    t.wait("L", "b", S)
    view = t.t.get("L")
    assert [h.owner for h in view.holders] == ["z", "a"]
    assert [w.owner for w in view.waiters] == ["m", "b"]
    assert view.mode is S
    assert t.t.get("nothing") is None


def test_hold_of_and_is_waiting_answer_for_one_owner(t):
    g = t.grant("L", "a", ttl=100)
    b = t.wait("L", "b")
    assert t.t.hold_of("L", "a") == g and t.t.hold_of("L", "b") is None
    assert t.t.hold_of("nothing", "a") is None
    assert t.t.is_waiting("L", "b", b.seq)
    assert not t.t.is_waiting("L", "b", b.seq + 1)  # another wait of the same owner
    assert not t.t.is_waiting("L", "a", b.seq) and not t.t.is_waiting("M", "b", b.seq)
    t.rel("L", "a", g.token)
    assert not t.t.is_waiting("L", "b", b.seq)
    assert t.t.hold_of("L", "b").token == t.granted_events()[0][1]


def test_hold_of_gives_the_expiry_of_the_current_lease_epoch(t):
    t.now = 5_000_000
    t.grant("L", "a", ttl=100)
    t.t.leader_change(7)
    assert t.t.hold_of("L", "a").expires_at_ms == 107 == t.t.get("L").holders[0].expires_at_ms


def test_all_held_lists_only_locks_with_holders(t):
    g = t.grant("B", "a")
    t.grant("A", "a")
    t.rel("B", "a", g.token)
    assert [v.name for v in t.t.all_held()] == ["A"]


def test_a_token_is_valid_only_while_its_holder_holds(t):
    g = t.grant("L", "a")
    assert t.t.validate("L", g.token)
    assert not t.t.validate("L", g.token + 1)
    assert not t.t.validate("M", g.token)
    t.rel("L", "a", g.token)
    assert not t.t.validate("L", g.token)


def test_expired_lists_due_holds_earliest_first(t):
    t.grant("L", "a", ttl=30)
    t.grant("M", "b", ttl=10)
    t.grant("N", "c", ttl=50)
    assert [d.name for d in t.t.expired(30)] == ["M", "L"]


def test_expiry_index_survives_many_keepalives():
    # Stale heap entries pile up and are rebuilt away; answers stay right.
    t = T()
    g = t.grant("L", "a", ttl=10)
    for now in range(1, 5_000):
        t.now = now
        t.keepalive("L", "a", g.token)
    assert t.t.expired(5_008) == []
    assert t.t.expired(5_009) == [Due("L", "a", g.token, 5_009)]
    assert len(t.t._hold_deadlines) < 3_000


# --- deadlock -----------------------------------------------------------------------


def test_a_wait_that_would_close_a_cycle_is_refused_and_not_enqueued(t):
    t.grant("L1", "a")
    t.grant("L2", "b")
    t.wait("L2", "a")  # a -> b
    out = t.acq("L1", "b", wait=True)  # b -> a would close the cycle
    assert out == Deadlock("L1", ("b", "a"))
    assert t.waiters("L1") == []


def test_a_longer_cycle_is_found_and_reported_in_wait_order(t):
    for i, owner in enumerate("abc"):
        t.grant(f"L{i}", owner)
    t.wait("L1", "a")  # a -> b
    t.wait("L2", "b")  # b -> c
    out = t.acq("L0", "c", wait=True)  # c -> a
    assert out == Deadlock("L0", ("c", "a", "b"))


def test_many_waiters_on_one_lock_cost_the_deadlock_check_nothing(t):
    # Clients that hold nothing and wait nowhere else cannot close a cycle: no search.
    t.grant("hot", "holder")
    for i in range(3_000):
        t.wait("hot", f"w{i}")
    assert t.t.graph_steps == 0 and len(t.waiters("hot")) == 3_000


def test_the_deadlock_check_of_a_long_queue_walks_only_who_waits_for_the_newcomer(t):
    # Each waiter holds a lock somebody waits for, so none is spared the check. The old
    # search walked forward from the newcomer, re-walking the queue ahead of each waiter
    # it reached (n^3 / 6 steps to build a queue of n: 4.5 million for 300; a queue of
    # 2,000 waiters took 270 s to apply and stalled the Raft loop). The check now walks
    # back from the newcomer: here one owner each.
    n = 300
    t.grant("hot", "holder")
    for i in range(n):
        t.grant(f"own{i}", f"w{i}")
        t.wait(f"own{i}", f"x{i}")  # x_i waits for w_i
        t.wait("hot", f"w{i}")
    assert t.t.graph_steps <= 2 * n
    # A cycle through the queue is still found: holder -> w0 -> holder.
    assert t.acq("own0", "holder", wait=True) == Deadlock("own0", ("holder", "w0"))


def test_a_shared_acquire_looks_at_one_holder_not_all():
    # Holders are one exclusive or many shared, so the first tells; looking at all of
    # them made 10,000 shared acquires of one lock take 5 s to apply.
    class FirstOnly(dict):
        def values(self):
            items = iter(dict.values(self))
            yield next(items)
            raise AssertionError("looked past the first holder")

    holders = FirstOnly({f"s{i}": Hold(f"s{i}", S, i, 10, 10) for i in range(1_000)})
    assert compatible(S, holders) and not compatible(X, holders)
    assert not compatible(S, FirstOnly({"x": Hold("x", X, 1, 10, 10)}))


def test_a_try_lock_never_reports_deadlock(t):
    t.grant("L1", "a")
    t.grant("L2", "b")
    t.wait("L2", "a")
    assert isinstance(t.acq("L1", "b", wait=False), Held)


def test_a_waiter_waits_for_an_exclusive_waiter_ahead_of_it(t):
    # h holds L shared; x waits exclusive on L and also on M, which y holds.
    # y asking for L shared queues behind x, and x waits for y: deadlock.
    t.grant("L", "h", S)
    t.grant("M", "y")
    t.wait("L", "x", X)
    t.wait("M", "x", X)
    out = t.acq("L", "y", S, wait=True)
    assert out == Deadlock("L", ("y", "x"))


def test_shared_waiters_do_not_wait_for_each_other(t):
    # s1 and s2 wait shared on L behind h: they will be granted together, so s2
    # does not wait for s1, even though s1 (through M and N) waits for s2.
    t.grant("L", "h")
    t.grant("M", "k")
    t.grant("N", "s2")
    t.wait("L", "s1", S)  # s1 -> h
    t.wait("M", "s1")  # s1 -> k
    t.wait("N", "k")  # k -> s2
    out = t.acq("L", "s2", S, wait=True)
    assert isinstance(out, Queued)
    assert t.t.wait_for_graph() == {"k": ("s2",), "s1": ("h", "k"), "s2": ("h",)}


# --- listing a page at a time ---------------------------------------------------------


def test_pages_of_held_locks_cover_them_in_name_order_once_each():
    t = T(max_tombstones=3)
    held = set()
    for i in [5, 3, 9, 1, 7, 2, 8, 0, 6, 4]:
        t.grant(f"L{i}", "a")
        held.add(f"L{i}")
    g = t.grant("L10", "a")
    t.rel("L10", "a", g.token)  # free (a tombstone): not listed
    t.wait("L3", "b")  # a waiter does not make it listed twice
    listed, after, pages = [], None, 0
    while True:
        views, more = t.t.held_page(after, 3)
        pages += 1
        listed += [v.name for v in views]
        if not more:
            break
        assert len(views) == 3
        after = views[-1].name
    assert listed == sorted(held) and pages == 4
    assert [v.name for v in t.t.held_page(None, 100)[0]] == [v.name for v in t.t.all_held()]


def test_a_page_sees_locks_added_and_forgotten_since_the_last_one():
    t = T(max_tombstones=1)
    tokens = {n: t.grant(n, "a").token for n in ("B", "D")}
    assert [v.name for v in t.t.held_page(None, 10)[0]] == ["B", "D"]
    t.grant("C", "a")  # a new name after the list of names was sorted
    assert [v.name for v in t.t.held_page("B", 10)[0]] == ["C", "D"]
    t.rel("B", "a", tokens["B"])
    t.rel("D", "a", tokens["D"])  # B is forgotten (one tombstone kept): D's stays
    assert t.t.get("B") is None
    assert [v.name for v in t.t.held_page(None, 10)[0]] == ["C"]
    assert t.t.held_page("C", 10) == ([], False)
    assert [v.name for v in t.t.held_page("A", 1)[0]] == ["C"]
