"""Property tests: random command sequences against the lock machine.

A hypothesis state machine drives LockStateMachine with random commands (valid, stale
and garbage) and keeps an independent model of holders and FIFO queues built only from
results and events. After every step it checks:
- never two exclusive holders, never shared and exclusive together (lock invariants);
- holders and queues equal the model: every grant came from the head of the queue
  (FIFO: no waiter granted before an earlier one), nobody cancelled or expired is ever
  granted, nobody is granted twice;
- each grant's token is the index of the command that caused it, exclusive tokens
  strictly increase per name and shared ones never decrease;
- the wait-for graph equals one computed from the public views, and has no cycle; a
  reported deadlock is a real cycle;
- expiry queries equal a brute-force scan;
- materialised writes, applied in order, equal dump(); a machine loaded from a dump at
  any point behaves identically afterwards (same results, events and state).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from service.locks import Granted, LockStateMachine, LockView, WaitDropped
from service.locks.codec import invariant_violations
from service.raft.runner import decode_snapshot_data
from service.snapshot_entries import join_entries
from service.statemachine import Command

from .driver import apply_writes, copy_hashes

NAMES = ("L1", "L2", "L3")
OWNERS = ("a", "b", "c", "d")

names = st.sampled_from(NAMES)
owners = st.sampled_from(OWNERS)
modes = st.sampled_from(("exclusive", "shared"))
ttls = st.sampled_from((5, 20, 60))
tokens = st.one_of(st.none(), st.integers(0, 60))  # None: the holder's real token

garbage_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.integers(), max_size=2),
)
garbage_args = st.one_of(
    garbage_values,
    st.dictionaries(
        st.sampled_from(("name", "owner", "mode", "ttl_ms", "wait", "wait_ms", "token", "seq")),
        st.one_of(garbage_values, names, owners, modes),
        max_size=6,
    ),
)
OPS = (
    "lock.acquire",
    "lock.release",
    "lock.keepalive",
    "lock.expire",
    "lock.cancel_wait",
    "lock.expire_wait",
    "lock.frobnicate",
)


def graph_from_views(views: list[LockView]) -> dict[str, set[str]]:
    """The wait-for graph by its definition, from public views only."""
    graph: dict[str, set[str]] = {}
    for view in views:
        for i, waiter in enumerate(view.waiters):
            edges = graph.setdefault(waiter.owner, set())
            edges.update(h.owner for h in view.holders)
            for ahead in view.waiters[:i]:
                if "exclusive" in (ahead.mode.value, waiter.mode.value):
                    edges.add(ahead.owner)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state:
                found = visit(nxt, [*path, node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


class LockMachineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # A small tombstone bound so forgetting free locks is exercised too.
        self.machine = LockStateMachine(max_tombstones=1)
        self.shadow: LockStateMachine | None = None
        self.index = 0
        self.now = 0
        self.store: dict[str, dict[str, str]] = {}
        self.holders: dict[str, dict[str, tuple[str, int]]] = {n: {} for n in NAMES}
        self.queues: dict[str, list[tuple[str, str, int]]] = {n: [] for n in NAMES}
        self.max_token: dict[str, int] = dict.fromkeys(NAMES, 0)
        self.views_before: dict[str, LockView | None] = {}

    # --- plumbing ----------------------------------------------------------------------

    def run(self, op: str, args: Any) -> Any:
        self.index += 1
        command = Command(op, args, now_ms=self.now)
        graph_before = {k: set(v) for k, v in self.machine.wait_for_graph().items()}
        self.views_before = {n: self.machine.get(n) for n in NAMES}
        result = self.machine.apply(self.index, command)
        events = self.machine.take_events()
        if self.shadow is not None:
            assert self.shadow.apply(self.index, command) == result
            assert self.shadow.take_events() == events
            self.shadow.take_writes()
        # The snapshot entries, with this command's changes not yet taken as writes
        # (the invariant checks them again after): packed entries of locks unchanged
        # since are reused, and must still equal a fresh encoding.
        assert unpacked_snapshot(self.machine) == self.machine.dump()
        apply_writes(self.store, self.machine.take_writes())
        # Coverage, shown by `pytest --hypothesis-show-statistics`.
        event(f"{op} -> {result['status']}")
        for e in events:
            event(f"event {type(e).__name__}")
        if isinstance(args, dict):
            self.observe(op, args, result, events, graph_before)
        return result

    def observe(
        self,
        op: str,
        args: dict[str, Any],
        result: Any,
        events: list[Any],
        graph_before: dict[str, set[str]],
    ) -> None:
        status = result["status"]
        name, owner = args.get("name"), args.get("owner")
        if op == "lock.acquire" and status == "granted":
            if result["token"] == self.index:
                assert self.queues[name] == [], "granted at once although someone waits"
                self.new_grant(name, owner, result["mode"], result["token"])
            else:  # re-acquire: the very same grant
                assert self.holders[name][owner] == (result["mode"], result["token"])
        elif op == "lock.acquire" and status == "queued":
            entry = (owner, result["mode"], result["seq"])
            if result["seq"] == self.index:
                self.queues[name].append(entry)
            assert self.queues[name][result["position"] - 1] == entry
        elif op == "lock.acquire" and status == "deadlock":
            cycle = result["cycle"]
            assert cycle[0] == owner
            for a, b in zip(cycle[1:], [*cycle[2:], cycle[0]], strict=True):
                assert b in graph_before.get(a, set()), f"{a} does not wait for {b}"
        elif op in ("lock.release", "lock.expire") and status in ("released", "expired"):
            del self.holders[name][owner]
            if op == "lock.expire":  # only a lease that really ran out, as of the command
                view = self.views_before[name]
                assert view is not None
                hold = next(h for h in view.holders if h.owner == owner)
                assert hold.token == args["token"] and hold.expires_at_ms <= self.now
        elif op == "lock.expire_wait" and status == "expired":
            view = self.views_before[name]
            assert view is not None
            waiter = next(w for w in view.waiters if w.owner == owner)
            assert waiter.seq == args["seq"] and waiter.deadline_ms <= self.now
        elif op == "lock.cancel_wait" and status == "granted":
            assert self.holders[name][owner] == (result["mode"], result["token"])
        for ev in events:
            queue = self.queues[ev.name]
            if isinstance(ev, Granted):
                # FIFO: a waiter is granted only from the head of the queue.
                assert queue and queue[0][0] == ev.owner, (queue, ev)
                queue.pop(0)
                self.new_grant(ev.name, ev.owner, ev.mode.value, ev.token)
            else:
                assert isinstance(ev, WaitDropped)
                assert (ev.owner, ev.seq) in [(o, s) for o, _, s in queue]
                self.queues[ev.name] = [w for w in queue if w[2] != ev.seq]

    def new_grant(self, name: str, owner: str, mode: str, token: int) -> None:
        assert token == self.index, "a token is the index of the command that granted it"
        assert owner not in self.holders[name], "granted twice"
        if mode == "exclusive":
            assert token > self.max_token[name]
        else:
            assert token >= self.max_token[name]
        self.max_token[name] = token
        self.holders[name][owner] = (mode, token)

    def token_for(self, name: str, owner: str, token: int | None) -> int:
        if token is None:
            held = self.holders[name].get(owner)
            return held[1] if held else 0
        return token

    # --- rules -------------------------------------------------------------------------

    @rule(
        name=names,
        owner=owners,
        mode=modes,
        ttl=ttls,
        wait=st.booleans(),
        wait_ms=st.sampled_from((None, 0, 10, 40)),
    )
    def acquire(
        self, name: str, owner: str, mode: str, ttl: int, wait: bool, wait_ms: int | None
    ) -> None:
        args: dict[str, Any] = {
            "name": name,
            "owner": owner,
            "mode": mode,
            "ttl_ms": ttl,
            "wait": wait,
        }
        if wait_ms is not None:
            args["wait_ms"] = wait_ms
        self.run("lock.acquire", args)

    # Rules are drawn uniformly, so the interesting ones appear twice to make queues,
    # side-effect grants and deadlocks common.
    @rule(name=names, owner=owners, mode=modes, ttl=ttls)
    def acquire_and_wait(self, name: str, owner: str, mode: str, ttl: int) -> None:
        self.run(
            "lock.acquire",
            {"name": name, "owner": owner, "mode": mode, "ttl_ms": ttl, "wait": True},
        )

    @rule(name=names, owner=owners, mode=modes)
    def acquire_and_wait_long(self, name: str, owner: str, mode: str) -> None:
        self.run(
            "lock.acquire",
            {"name": name, "owner": owner, "mode": mode, "ttl_ms": 500, "wait": True},
        )

    @rule(pick=st.integers(0, 11))
    def release_a_hold(self, pick: int) -> None:
        held = [(n, o, t) for n in NAMES for o, (_, t) in sorted(self.holders[n].items())]
        if held:
            name, owner, token = held[pick % len(held)]
            assert self.run("lock.release", {"name": name, "owner": owner, "token": token}) == {
                "status": "released"
            }

    @rule(pick=st.integers(0, 11), delta=st.sampled_from((-1, 1)))
    def release_a_hold_with_a_stale_token(self, pick: int, delta: int) -> None:
        held = [(n, o, t) for n in NAMES for o, (_, t) in sorted(self.holders[n].items())]
        if held:
            name, owner, token = held[pick % len(held)]
            args = {"name": name, "owner": owner, "token": token + delta}
            assert self.run("lock.release", args) == {"status": "stale_token"}

    @rule(pick=st.integers(0, 11), ttl=st.one_of(st.none(), ttls))
    def keepalive_a_hold(self, pick: int, ttl: int | None) -> None:
        held = [(n, o, t) for n in NAMES for o, (_, t) in sorted(self.holders[n].items())]
        if held:
            name, owner, token = held[pick % len(held)]
            args: dict[str, Any] = {"name": name, "owner": owner, "token": token}
            if ttl is not None:
                args["ttl_ms"] = ttl
            result = self.run("lock.keepalive", args)
            assert result["status"] == "ok" and result["expires_at_ms"] > self.now

    @rule(name=names, owner=owners, token=tokens)
    def release(self, name: str, owner: str, token: int | None) -> None:
        token = self.token_for(name, owner, token)
        self.run("lock.release", {"name": name, "owner": owner, "token": token})

    @rule(name=names, owner=owners, token=tokens, ttl=st.one_of(st.none(), ttls))
    def keepalive(self, name: str, owner: str, token: int | None, ttl: int | None) -> None:
        args: dict[str, Any] = {
            "name": name,
            "owner": owner,
            "token": self.token_for(name, owner, token),
        }
        if ttl is not None:
            args["ttl_ms"] = ttl
        result = self.run("lock.keepalive", args)
        assert (result["status"] == "ok") == (
            self.holders[name].get(owner, ("", -1))[1] == args["token"]
        )

    @rule(pick=st.integers(0, 7))
    def leader_expires_a_lease(self, pick: int) -> None:
        due = self.machine.expired(self.now)
        if due:
            d = due[pick % len(due)]
            assert self.run(
                "lock.expire", {"name": d.name, "owner": d.owner, "token": d.ident}
            ) == {"status": "expired"}

    @rule(name=names, owner=owners, token=tokens)
    def stale_or_early_expire(self, name: str, owner: str, token: int | None) -> None:
        token = self.token_for(name, owner, token)
        self.run("lock.expire", {"name": name, "owner": owner, "token": token})

    @rule(pick=st.integers(0, 11), with_seq=st.booleans())
    def cancel_a_wait(self, pick: int, with_seq: bool) -> None:
        waiting = [(n, o, s) for n in NAMES for o, _, s in self.queues[n]]
        if waiting:
            name, owner, seq = waiting[pick % len(waiting)]
            args: dict[str, Any] = {"name": name, "owner": owner}
            if with_seq:
                args["seq"] = seq
            assert self.run("lock.cancel_wait", args) == {"status": "cancelled"}

    @rule(name=names, owner=owners, with_seq=st.booleans(), seq=st.integers(0, 60))
    def cancel_wait(self, name: str, owner: str, with_seq: bool, seq: int) -> None:
        args: dict[str, Any] = {"name": name, "owner": owner}
        if with_seq:
            args["seq"] = seq
        self.run("lock.cancel_wait", args)

    @rule(pick=st.integers(0, 7))
    def leader_expires_a_wait(self, pick: int) -> None:
        due = self.machine.expired_waits(self.now)
        if due:
            d = due[pick % len(due)]
            assert self.run(
                "lock.expire_wait", {"name": d.name, "owner": d.owner, "seq": d.ident}
            ) == {"status": "expired"}

    @rule(name=names, owner=owners, seq=st.integers(0, 60))
    def stale_or_early_expire_wait(self, name: str, owner: str, seq: int) -> None:
        self.run("lock.expire_wait", {"name": name, "owner": owner, "seq": seq})

    @rule(ms=st.integers(0, 60))
    def time_passes(self, ms: int) -> None:
        self.now += ms

    @rule(ms=st.integers(0, 60), pick=st.integers(0, 7))
    def time_passes_and_the_leader_expires(self, ms: int, pick: int) -> None:
        self.now += ms
        self.leader_expires_a_lease(pick)
        self.leader_expires_a_wait(pick)

    @rule(now=st.integers(0, 200))
    def leader_change(self, now: int) -> None:
        # The new leader's monotonic clock may be far behind the old one's.
        self.now = now
        self.run("lock.leader_change", {})
        for view in (self.machine.get(n) for n in NAMES):
            if view is not None:
                assert all(h.expires_at_ms == now + h.ttl_ms for h in view.holders)
                assert all(w.deadline_ms == now + w.wait_ms for w in view.waiters)
        assert self.machine.expired(now) == [] and self.machine.expired_waits(now) == []

    @rule()
    def restart_from_dump(self) -> None:
        self.shadow = LockStateMachine(max_tombstones=1)
        self.shadow.load(copy_hashes(self.machine.dump()))

    @rule(op=st.sampled_from(OPS), args=garbage_args)
    def garbage(self, op: str, args: Any) -> None:
        before = self.machine.dump()
        result = self.run(op, args)
        if result["status"] == "error":
            assert self.machine.dump() == before

    # --- invariants --------------------------------------------------------------------

    @invariant()
    def locks_are_consistent(self) -> None:
        for name in NAMES:
            state = self.machine._table.state(name)
            if state is not None:
                assert invariant_violations(state) == []
            view = self.machine.get(name)
            holders = (
                {} if view is None else {h.owner: (h.mode.value, h.token) for h in view.holders}
            )
            waiters = [] if view is None else [(w.owner, w.mode.value, w.seq) for w in view.waiters]
            assert holders == self.holders[name]
            assert waiters == self.queues[name]
            for mode, token in holders.values():
                assert self.machine.validate(name, token)
                del mode

    @invariant()
    def wait_for_graph_is_as_defined_and_acyclic(self) -> None:
        views = [v for v in (self.machine.get(n) for n in NAMES) if v is not None]
        graph = graph_from_views(views)
        assert {k: set(v) for k, v in self.machine.wait_for_graph().items()} == graph
        assert find_cycle(graph) is None

    @invariant()
    def expiry_queries_match_a_scan(self) -> None:
        views = [v for v in (self.machine.get(n) for n in NAMES) if v is not None]
        for now in (self.now, self.now + 25):
            holds = sorted(
                (h.expires_at_ms, v.name, h.owner, h.token)
                for v in views
                for h in v.holders
                if h.expires_at_ms <= now
            )
            waits = sorted(
                (w.deadline_ms, v.name, w.owner, w.seq)
                for v in views
                for w in v.waiters
                if w.deadline_ms <= now
            )
            assert [
                (d.deadline_ms, d.name, d.owner, d.ident) for d in self.machine.expired(now)
            ] == holds
            assert [
                (d.deadline_ms, d.name, d.owner, d.ident) for d in self.machine.expired_waits(now)
            ] == waits

    @invariant()
    def materialised_state_equals_dump(self) -> None:
        dump = self.machine.dump()
        assert self.store == dump
        assert unpacked_snapshot(self.machine) == dump
        if self.shadow is not None:
            assert self.shadow.dump() == dump


def unpacked_snapshot(machine: LockStateMachine) -> dict[str, dict[str, str]]:
    return decode_snapshot_data(join_entries(machine.packed_dump()))


TestLockMachine = LockMachineModel.TestCase
TestLockMachine.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- dump/load equivalence as a plain property -----------------------------------------

command_st = st.one_of(
    st.builds(
        lambda n, o, m, t, w: (
            "lock.acquire",
            {"name": n, "owner": o, "mode": m, "ttl_ms": t, "wait": w},
        ),
        names,
        owners,
        modes,
        ttls,
        st.booleans(),
    ),
    st.builds(
        lambda n, o, t: ("lock.release", {"name": n, "owner": o, "token": t}),
        names,
        owners,
        st.integers(0, 40),
    ),
    st.builds(
        lambda n, o, t: ("lock.expire", {"name": n, "owner": o, "token": t}),
        names,
        owners,
        st.integers(0, 40),
    ),
    st.builds(lambda n, o: ("lock.cancel_wait", {"name": n, "owner": o}), names, owners),
    st.builds(lambda: ("lock.leader_change", {})),
)
timed_commands = st.lists(st.tuples(command_st, st.integers(0, 20)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(commands=timed_commands, cut=st.integers(0, 40))
def test_a_machine_loaded_from_a_dump_behaves_the_same_afterwards(
    commands: list[tuple[tuple[str, dict[str, Any]], int]], cut: int
) -> None:
    original = LockStateMachine()
    restarted: LockStateMachine | None = None
    now = 0
    for index, ((op, args), dt) in enumerate(commands, start=1):
        if index == cut + 1 or (restarted is None and index == len(commands)):
            restarted = LockStateMachine()
            restarted.load(copy_hashes(original.dump()))
        now += dt
        command = Command(op, args, now_ms=now)
        result = original.apply(index, command)
        events = original.take_events()
        if restarted is not None:
            assert restarted.apply(index, command) == result
            assert restarted.take_events() == events
    if restarted is not None:
        assert restarted.dump() == original.dump()
        assert restarted.expired(now + 100) == original.expired(now + 100)
        assert restarted.wait_for_graph() == original.wait_for_graph()
