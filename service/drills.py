"""Failure drills: `python -m service drill failover|restart-all|disk-loss`.

Each drill starts a fresh local cluster (real node processes, each with its own
redis-server, on 127.0.0.1), runs a closed-loop lock load against every node and crashes
the cluster mid-run:

- failover     kill -9 the leader and its Redis; the survivors must elect a new leader
               and grant locks again (target: within 1 s).
- restart-all  kill -9 every node and its Redis, then start them all again over the
               data they left behind.
- disk-loss    kill -9 the leader and its Redis, delete its data directory, and start it
               again empty: the survivors elect a leader and grant locks; the node
               rejoins (service/raft/rejoin.py) and the drill reports when it caught up.

Every acknowledged grant is recorded (name, owner, token, when it was acknowledged), and
afterwards the drill checks that none went missing:

- holds acquired before the crash and kept through it ("sentinels") still show their
  owner and token in `GET /v1/locks/{name}` afterwards;
- a release of an acknowledged grant never finds it gone (`not_held` / `stale_token`)
  while its lease could not have expired yet;
- fencing tokens strictly increase per name in acknowledgement order, and a grant after
  the run gets a token above every token acknowledged during it;
- no two holders of one name were acknowledged as holding it at overlapping times (the
  interval a client knows it holds a lock: from the grant's acknowledgement until it
  sends its release);
- no lock whose release was acknowledged is still held by that owner.

A request that times out or loses its connection has an unknown outcome, never a failed
one: it is retried with the same request_id (applied at most once) until it is answered,
and only an outcome that stays unknown is reported as such.

Exit code 0 when nothing was lost, 1 otherwise (2 for unusable arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from service.cluster import LocalCluster, cluster_ports, port_free
from service.config import REDIS_PORT_OFFSET
from service.transport.sessions import client_session

__all__ = ["Grant", "HistoryCheck", "check_history", "run_drill"]

# One attempt's budget: a follower holds a request up to 3 s while no leader is known
# (service.api.forwarding.LEADER_WAIT_SECONDS), so give it a little more than that.
ATTEMPT_TIMEOUT_SECONDS = 4.0
# How long a request with an unknown outcome is retried (same request_id) before the
# drill gives up on learning it.
RESOLVE_SECONDS = 20.0
MAX_ATTEMPTS = 400
RETRY_BACKOFF_SECONDS = (0.01, 0.2)
# Far longer than any drill: no lease may legitimately expire while it runs (leases also
# restart their budget when a new leader takes over).
LEASE_TTL_MS = 120_000
HOLD_SECONDS = (0.002, 0.015)
AFTER_LOCK_HELD_SECONDS = 0.002
MAX_CYCLES_PER_CLIENT = 1_000_000
CLUSTER_START_TIMEOUT = 60.0
RECOVERY_TIMEOUT = 30.0
LEADER_POLL_SECONDS = 0.01
CLIENT_DRAIN_TIMEOUT = RESOLVE_SECONDS + 2 * ATTEMPT_TIMEOUT_SECONDS + 5.0
LOCK_PREFIX = "drill-"
SENTINEL_PREFIX = "drill-keep-"
VERIFIER_OWNER = "drill-verifier"
# The kill happens at this point of the load (of args.seconds); the rest is measured
# from the moment locks are granted again.
PRE_KILL_SHARE = 0.5


SCENARIOS = ("failover", "restart-all", "disk-loss")
REJOIN_TIMEOUT = 30.0


def run_drill(args: argparse.Namespace) -> int:
    """Run the drill named by args.scenario; print the figures; 0 when nothing was lost."""
    scenario: str = args.scenario
    nodes: int = args.nodes
    clients: int = args.clients
    seconds: float = args.seconds
    base_port: int = args.base_port
    if scenario not in SCENARIOS:
        return _usage(f"unknown scenario {scenario!r}")
    if scenario in ("failover", "disk-loss") and not 3 <= nodes <= 9:
        return _usage(f"{scenario} needs 3 to 9 nodes (a majority must survive the kill)")
    if not 1 <= nodes <= 9:
        return _usage("--nodes must be 1 to 9")
    if not 1 <= clients <= 1024:
        return _usage("--clients must be 1 to 1024")
    if not 0.5 <= seconds <= 3600:
        return _usage("--seconds must be 0.5 to 3600")
    if not 1024 <= base_port <= 65536 - nodes:
        return _usage(f"--base-port must be 1024 to {65536 - nodes}")
    busy = [p for p in cluster_ports(base_port, nodes) if not port_free(p)]
    if busy:
        return _usage(
            f"ports {busy} on 127.0.0.1 are in use; pick another --base-port (nodes use "
            f"base..base+{nodes - 1}, their Redis +{REDIS_PORT_OFFSET})"
        )

    if args.data is not None:
        data_root = Path(args.data)
        if data_root.exists() and any(data_root.iterdir()):
            return _usage(f"--data {data_root} is not empty; a drill starts a fresh cluster")
        data_root.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        data_root = Path(tempfile.mkdtemp(prefix="dsync-drill-"))
        temporary = True

    cluster = LocalCluster(
        size=nodes,
        base_port=base_port,
        data_root=data_root,
        log_to_files=True,
        extra_env={"LOG_LEVEL": "INFO"},
    )
    _say(
        f"drill {scenario}: {nodes} nodes on 127.0.0.1:{base_port}-{base_port + nodes - 1}, "
        f"{clients} clients, {seconds:g} s of load, data in {data_root}"
    )
    passed = False
    try:
        started = time.monotonic()
        cluster.start()
        try:
            leader = cluster.wait_for_leader(timeout=CLUSTER_START_TIMEOUT)
        except (TimeoutError, RuntimeError) as exc:
            _say(f"the cluster did not come up: {exc}")
            return 1
        _say(
            f"cluster up in {time.monotonic() - started:.2f} s; "
            f"leader {cluster.nodes[leader].node_id}"
        )
        drill = _Drill(cluster, scenario, clients, seconds)
        try:
            passed = asyncio.run(drill.run())
        except (TimeoutError, RuntimeError, OSError) as exc:
            _say(f"the drill could not go on: {exc}")
            return 1
        return 0 if passed else 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 1
    finally:
        cluster.stop(timeout=10)
        for i in range(cluster.size):
            with contextlib.suppress(Exception):
                cluster.kill(i)
        if temporary and passed:
            shutil.rmtree(data_root, ignore_errors=True)
        elif temporary:
            _say(f"node logs kept in {data_root}/<node>/node.log")


# --- records -------------------------------------------------------------------------


@dataclass(slots=True)
class Grant:
    """An acknowledged grant and what became of it."""

    name: str
    owner: str
    token: int
    ttl_ms: int
    first_sent_at: float  # first attempt of the acquire (the lease starts after this)
    sent_at: float  # the attempt that was answered
    acked_at: float
    release_sent_at: float | None = None
    release_acked_at: float | None = None
    # released | not_held | stale_token | unknown | kept (sentinel) | open (never released)
    release: str = "open"
    sentinel: bool = False

    def held_until(self, end: float) -> float:
        """End of the interval the client knows it holds the lock."""
        until = self.release_sent_at if self.release_sent_at is not None else end
        return min(until, self.first_sent_at + self.ttl_ms / 1000)


@dataclass(slots=True)
class Reply:
    status: int
    body: dict[str, Any]
    sent_at: float
    answered_at: float
    node: int

    @property
    def code(self) -> str:
        error = self.body.get("error")
        if isinstance(error, dict):
            return str(error.get("code", "error"))
        return "ok" if self.status == 200 else f"http_{self.status}"


@dataclass(slots=True)
class Route:
    """The node a client sends to; moves on when that node fails."""

    node: int


@dataclass(slots=True)
class Stats:
    attempts: int = 0
    no_answer: int = 0  # attempts that timed out or lost their connection: unknown
    refused: int = 0  # attempts that could not connect: never delivered
    retried: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    unresolved_acquires: list[tuple[str, str]] = field(default_factory=list)


# --- the drill -----------------------------------------------------------------------


class _Drill:
    def __init__(self, cluster: LocalCluster, scenario: str, clients: int, seconds: float):
        self.cluster = cluster
        self.scenario = scenario
        self.clients = clients
        self.seconds = seconds
        self.urls = [n.url for n in cluster.nodes]
        self.names = [f"{LOCK_PREFIX}{i}" for i in range(max(2, clients // 2))]
        self.grants: list[Grant] = []
        self.stats = Stats()
        self.stop = asyncio.Event()
        self.kill_at: float | None = None
        self.dead_at = 0.0  # when every killed process was gone
        self.victim: int | None = None  # disk-loss: the node started again empty
        # The first acquire sent after dead_at (so only the recovered cluster could grant
        # it) that was granted: locks are served again.
        self.recovered: Grant | None = None
        self.first_answer_at: float | None = None  # first /health answer after the kill
        self.t0 = 0.0
        self.session: aiohttp.ClientSession | None = None

    # --- HTTP --------------------------------------------------------------------------

    async def attempt(
        self,
        method: str,
        node: int,
        path: str,
        body: dict[str, Any] | None,
        timeout: float,
        *,
        counted: bool = True,
    ) -> Reply | None:
        """One request; None when it got no answer (its outcome is unknown)."""
        assert self.session is not None
        sent = time.monotonic()
        if counted:
            self.stats.attempts += 1
        try:
            async with self.session.request(
                method,
                self.urls[node] + path,
                json=body,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                raw = await response.read()
                status = response.status
        except aiohttp.ClientConnectorError:
            # Never delivered (connection refused: the node is down): not applied.
            if counted:
                self.stats.refused += 1
            return None
        except (TimeoutError, aiohttp.ClientError, OSError):
            if counted:
                self.stats.no_answer += 1
            return None
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"raw": raw.decode(errors="replace")}
        if not isinstance(parsed, dict):
            parsed = {"value": parsed}
        return Reply(status, parsed, sent, time.monotonic(), node)

    async def resolve(
        self, method: str, route: Route, path: str, body: dict[str, Any] | None
    ) -> Reply | None:
        """Send until a definitive answer (2xx or a 4xx other than 429), moving on to the
        next node after a failure (route remembers the node that answered); the body
        carries a request_id, so a retry is applied at most once. None when no definitive
        answer came within RESOLVE_SECONDS: the outcome is unknown."""
        deadline = time.monotonic() + RESOLVE_SECONDS
        rng = random.Random()
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.stats.retried += 1
            reply = await self.attempt(method, route.node, path, body, ATTEMPT_TIMEOUT_SECONDS)
            if reply is not None:
                self.stats.answers[reply.code] += 1
                if reply.status < 500 and reply.status != 429:
                    return reply
            route.node = (route.node + 1) % len(self.urls)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(rng.uniform(*RETRY_BACKOFF_SECONDS))
        return None

    # --- load --------------------------------------------------------------------------

    async def client(self, cid: int) -> None:
        rng = random.Random(cid)
        route = Route(cid % len(self.urls))
        for n in range(MAX_CYCLES_PER_CLIENT):
            if self.stop.is_set():
                return
            name = rng.choice(self.names)
            owner = f"c{cid}-{n}"  # unique per grant: re-acquiring never returns an old one
            grant = await self.acquire(route, name, owner)
            if grant is None:
                await asyncio.sleep(AFTER_LOCK_HELD_SECONDS)
                continue
            await asyncio.sleep(rng.uniform(*HOLD_SECONDS))
            await self.release(route, grant)

    async def acquire(
        self, route: Route, name: str, owner: str, *, sentinel: bool = False
    ) -> Grant | None:
        body = {
            "owner": owner,
            "mode": "exclusive",
            "ttl_ms": LEASE_TTL_MS,
            "request_id": uuid.uuid4().hex,
        }
        first_sent = time.monotonic()
        reply = await self.resolve("POST", route, f"/v1/locks/{name}", body)
        if reply is None:
            self.stats.unresolved_acquires.append((name, owner))
            return None
        if reply.status != 200:
            return None
        grant = Grant(
            name,
            owner,
            int(reply.body["token"]),
            LEASE_TTL_MS,
            first_sent,
            reply.sent_at,
            reply.answered_at,
            sentinel=sentinel,
            release="kept" if sentinel else "open",
        )
        self.grants.append(grant)
        if (
            self.dead_at
            and not sentinel
            and grant.sent_at >= self.dead_at
            and (self.recovered is None or grant.acked_at < self.recovered.acked_at)
        ):
            self.recovered = grant
        return grant

    async def release(self, route: Route, grant: Grant) -> None:
        body = {"owner": grant.owner, "token": grant.token, "request_id": uuid.uuid4().hex}
        grant.release_sent_at = time.monotonic()
        reply = await self.resolve("DELETE", route, f"/v1/locks/{grant.name}", body)
        if reply is None:
            grant.release = "unknown"
            return
        grant.release_acked_at = reply.answered_at
        grant.release = "released" if reply.status == 200 else reply.code

    # --- crash and recovery ------------------------------------------------------------

    async def health(self, index: int) -> tuple[dict[str, Any], float] | None:
        reply = await self.attempt("GET", index, "/health", None, 0.5, counted=False)
        if reply is None or reply.status != 200:
            return None
        return reply.body, reply.answered_at

    async def watch_leader(
        self, candidates: list[int], old_term: int
    ) -> tuple[float, str, int] | None:
        """(time answered, node, term) of the first node reporting itself leader in a
        term after old_term."""
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while time.monotonic() < deadline:
            views = await asyncio.gather(*(self.health(i) for i in candidates))
            for view in views:
                if view is None:
                    continue
                body, answered = view
                if self.first_answer_at is None:
                    self.first_answer_at = answered
                term = body.get("term")
                if body.get("role") == "leader" and isinstance(term, int) and term > old_term:
                    return answered, str(body.get("node")), term
            await asyncio.sleep(LEADER_POLL_SECONDS)
        return None

    async def report_rejoin(self, victim: int, kill_at: float) -> bool:
        """disk-loss: the emptied node must catch up (and vote again) in time."""
        deadline = time.monotonic() + REJOIN_TIMEOUT
        while time.monotonic() < deadline:
            view = await self.health(victim)
            if view is not None and view[0].get("rejoining") is False and view[0]["leader"]:
                body, answered = view
                _say(
                    f"rejoined: {self.cluster.nodes[victim].node_id} caught up (log at "
                    f"{body.get('last_log_index')}, voting again) {answered - kill_at:.3f} s "
                    "after the kill"
                )
                return True
            await asyncio.sleep(LEADER_POLL_SECONDS)
        _say(f"rejoined: not within {REJOIN_TIMEOUT:.0f} s")
        return False

    async def crash(self) -> tuple[list[int], int, str]:
        """Kill as the scenario says; (nodes that will answer afterwards, old term, what
        was done)."""
        leader = await asyncio.to_thread(self.cluster.leader)
        if leader is None:
            leader = await asyncio.to_thread(self.cluster.wait_for_leader, 10.0)
        view = await self.health(leader)
        old_term = int(view[0]["term"]) if view is not None else 0
        leader_id = self.cluster.nodes[leader].node_id
        if self.scenario == "failover":
            self.kill_at = time.monotonic()
            await asyncio.to_thread(self.cluster.kill, leader)
            self.dead_at = time.monotonic()
            survivors = [i for i in range(self.cluster.size) if i != leader]
            return (
                survivors,
                old_term,
                f"kill -9 {leader_id} (leader, term {old_term}) and its redis-server",
            )
        if self.scenario == "disk-loss":
            self.kill_at = time.monotonic()
            await asyncio.to_thread(self.cluster.lose_disk, leader)
            self.dead_at = time.monotonic()
            await asyncio.to_thread(self.cluster.start, leader)
            self.victim = leader
            survivors = [i for i in range(self.cluster.size) if i != leader]
            return (
                survivors,
                old_term,
                f"kill -9 {leader_id} (leader, term {old_term}) and its redis-server, "
                "delete its data directory, start it again empty",
            )
        self.kill_at = time.monotonic()
        for node in self.cluster.nodes:  # every node at once, as a power cut would
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
        await asyncio.to_thread(self.cluster.kill_all)  # then their redis-servers; reap
        self.dead_at = time.monotonic()
        await asyncio.to_thread(self.cluster.start)
        everyone = list(range(self.cluster.size))
        return (
            everyone,
            old_term,
            (
                f"kill -9 all {self.cluster.size} nodes and their redis-servers (leader was "
                f"{leader_id}, term {old_term}), then start them all"
            ),
        )

    # --- main --------------------------------------------------------------------------

    async def run(self) -> bool:
        connector = aiohttp.TCPConnector(limit=self.clients * 2 + 16, limit_per_host=0)
        async with client_session(connector=connector) as session:
            self.session = session
            return await self._run()

    async def _run(self) -> bool:
        # Sentinels: acknowledged holds that live through the crash.
        sentinels: list[Grant] = []
        for i in range(len(self.urls) * 2):
            grant = await self.acquire(
                Route(i % len(self.urls)), f"{SENTINEL_PREFIX}{i}", f"keeper-{i}", sentinel=True
            )
            if grant is None:
                _say(f"could not take sentinel lock {SENTINEL_PREFIX}{i} before the crash")
                return False
            sentinels.append(grant)

        self.t0 = time.monotonic()
        tasks = [asyncio.create_task(self.client(c)) for c in range(self.clients)]
        pre = max(0.25, self.seconds * PRE_KILL_SHARE)
        post = max(0.25, self.seconds - pre)
        recovered: Grant | None = None
        leader_seen: tuple[float, str, int] | None = None
        rejoin: asyncio.Task[bool] | None = None
        stop_at = self.t0 + pre
        try:
            await asyncio.sleep(pre)
            survivors, old_term, what = await self.crash()
            assert self.kill_at is not None
            if self.victim is not None:  # watch it catch up while the load runs
                rejoin = asyncio.create_task(self.report_rejoin(self.victim, self.kill_at))
            _say(
                f"t={self.kill_at - self.t0:.2f} s: {what} (all gone "
                f"{(self.dead_at - self.kill_at) * 1000:.0f} ms later)"
            )
            leader_seen = await self.watch_leader(survivors, old_term)
            deadline = self.kill_at + RECOVERY_TIMEOUT
            while time.monotonic() < deadline and self.recovered is None:
                await asyncio.sleep(0.01)
            recovered = self.recovered
            if recovered is not None:
                await asyncio.sleep(max(0.0, recovered.acked_at + post - time.monotonic()))
        finally:
            stop_at = time.monotonic()
            self.stop.set()
            _, pending = await asyncio.wait(tasks, timeout=CLIENT_DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if pending:
            _say(f"{len(pending)} clients did not finish their last request; cancelled")

        assert self.kill_at is not None
        kill_at = self.kill_at
        if self.scenario == "restart-all" and self.first_answer_at is not None:
            _say(
                f"nodes answering again: {self.first_answer_at - kill_at:.3f} s after the "
                "kill (process start, Redis start, state load)"
            )
        if leader_seen is not None:
            answered, node_id, term = leader_seen
            _say(
                f"new leader: {node_id} (term {term}) answered {answered - kill_at:.3f} s "
                "after the kill"
            )
        else:
            _say(f"new leader: none within {RECOVERY_TIMEOUT:.0f} s of the kill")
        if recovered is not None:
            _say(
                f"recovery: locks granted again {recovered.acked_at - kill_at:.3f} s after "
                "the kill (first acquire sent after the killed processes were gone to be "
                "granted" + ("; target 1 s)" if self.scenario != "restart-all" else ")")
            )
        else:
            _say(f"recovery: no lock granted within {RECOVERY_TIMEOUT:.0f} s of the kill")

        self.report_throughput(kill_at, recovered, stop_at)
        ok = recovered is not None
        if rejoin is not None:
            ok = await rejoin and ok
        ok = await self.verify(sentinels, stop_at) and ok
        _say("result: PASS" if ok else "result: FAIL")
        return ok

    def report_throughput(self, kill_at: float, recovered: Grant | None, stop_at: float) -> None:
        load = [g for g in self.grants if not g.sentinel]
        released = [g for g in load if g.release == "released" and g.release_acked_at is not None]

        def rate(start: float, end: float) -> tuple[float, float]:
            span = end - start
            if span <= 0:
                return 0.0, 0.0
            grants = sum(1 for g in load if start <= g.acked_at < end)
            cycles = sum(1 for g in released if start <= (g.release_acked_at or 0.0) < end)
            return grants / span, cycles / span

        before = rate(self.t0, kill_at)
        _say(
            f"throughput before the kill: {before[0]:.1f} grants/s, {before[1]:.1f} "
            f"cycles/s (acquire+release) over {kill_at - self.t0:.2f} s"
        )
        if recovered is not None:
            after = rate(recovered.acked_at, stop_at)
            _say(
                f"throughput after recovery: {after[0]:.1f} grants/s, {after[1]:.1f} "
                f"cycles/s over {stop_at - recovered.acked_at:.2f} s"
            )
        bucket = max(0.25, (stop_at - self.t0) / 24)
        counts = [0] * (int((stop_at - self.t0) / bucket) + 1)
        for g in load:
            if self.t0 <= g.acked_at < stop_at:
                counts[int((g.acked_at - self.t0) / bucket)] += 1
        kill_bucket = int((kill_at - self.t0) / bucket)
        cells = [("|" if i == kill_bucket else "") + str(c) for i, c in enumerate(counts)]
        _say(f"grants per {bucket:.2f} s (| marks the kill): " + " ".join(cells))
        answers = ", ".join(f"{code} {n}" for code, n in sorted(self.stats.answers.items()))
        _say(
            f"requests: {self.stats.attempts} attempts, {self.stats.refused} refused "
            f"(node down), {self.stats.no_answer} without an answer (outcome unknown, "
            f"retried with the same request_id), {self.stats.retried} retries; "
            f"answers: {answers}"
        )

    # --- verification ------------------------------------------------------------------

    async def verify(self, sentinels: list[Grant], end: float) -> bool:
        """Check the records against the cluster; print the findings; True when clean."""
        alive = [i for i, n in enumerate(self.cluster.nodes) if n.alive()]
        if await self.watch_leader(alive, 0) is None:
            _say("verification: no leader to ask; cannot check the grants")
            return False
        node = Route(alive[0])
        lost: list[str] = []
        inconsistent: list[str] = []

        # 1. Holds acknowledged before the crash and never released must still be there.
        for grant in sentinels:
            reply = await self.resolve("GET", node, f"/v1/locks/{grant.name}", None)
            holders = _holders(reply)
            if holders is None:
                lost.append(f"{grant.name}: could not be read after the crash")
            elif (grant.owner, grant.token) not in holders:
                lost.append(
                    f"{grant.name}: acknowledged to {grant.owner} (token {grant.token}) and "
                    f"never released, but the cluster shows {sorted(holders) or 'no holder'}"
                )
            else:
                await self.release(node, grant)
                if grant.release != "released":
                    lost.append(f"{grant.name}: its release answered {grant.release}")

        load = [g for g in self.grants if not g.sentinel]

        # 2. A release must never find its (unexpired) grant gone.
        for grant in load:
            if grant.release in ("not_held", "stale_token"):
                could_expire = grant.first_sent_at + grant.ttl_ms / 1000
                if grant.release_acked_at is None or grant.release_acked_at < could_expire:
                    lost.append(
                        f"{grant.name}: {grant.owner} (token {grant.token}) was gone at "
                        f"release ({grant.release}) before its lease could expire"
                    )

        # 3. Tokens strictly increase per name in acknowledgement order; no overlap.
        history = check_history(load, end)
        by_name = history.by_name
        overlaps, order_violations = history.overlaps, history.order_violations
        inconsistent.extend(history.notes)

        # 4. The cluster's view afterwards: no released owner still holds; unknown
        #    releases are cleaned up; a fresh grant's token exceeds every acknowledged one.
        released_owners = {g.owner for g in load if g.release == "released"}
        open_grants = {(g.name, g.owner): g for g in load if g.release in ("unknown", "open")}
        unknown_acquired = set(self.stats.unresolved_acquires)
        still_held_after_release = 0
        regressions = 0
        for name in self.names:
            reply = await self.resolve("GET", node, f"/v1/locks/{name}", None)
            holders = _holders(reply)
            if holders is None:
                inconsistent.append(f"{name}: could not be read after the run")
                continue
            for owner, token in sorted(holders):
                if owner in released_owners:
                    still_held_after_release += 1
                    inconsistent.append(f"{name}: {owner} released (acknowledged) but still holds")
                if (name, owner) in open_grants or (name, owner) in unknown_acquired:
                    await self.release(node, Grant(name, owner, token, 0, 0.0, 0.0, 0.0))
            acked = [g.token for g in by_name.get(name, [])]
            if not acked:
                continue
            top = max(acked)
            fresh = await self.acquire(node, name, VERIFIER_OWNER, sentinel=True)
            if fresh is None:
                inconsistent.append(f"{name}: the verifier could not acquire it after the run")
                continue
            await self.release(node, fresh)
            if fresh.token <= top:
                forgotten = sum(1 for t in acked if t >= fresh.token)
                regressions += forgotten
                lost.append(
                    f"{name}: a grant after the run got token {fresh.token}, not above the "
                    f"{top} acknowledged during it ({forgotten} grants forgotten)"
                )

        unknown_releases = sum(1 for g in load if g.release == "unknown")
        _say(
            f"acknowledged grants: {len(load)} by the load on {len(by_name)} names, plus "
            f"{len(sentinels)} sentinel holds kept through the crash; unknown outcomes left: "
            f"{len(self.stats.unresolved_acquires)} acquires, {unknown_releases} releases"
        )
        _say(f"acknowledged grants lost: {len(lost)}")
        for line in lost[:10]:
            _say(f"  lost: {line}")
        _say(f"overlapping holders: {overlaps}")
        _say(f"token order violations: {order_violations}")
        _say(f"released locks still held: {still_held_after_release}")
        for line in inconsistent[:10]:
            _say(f"  inconsistent: {line}")
        return not lost and not inconsistent and overlaps == 0 and order_violations == 0


# --- checking a history ------------------------------------------------------------


@dataclass(slots=True)
class HistoryCheck:
    by_name: dict[str, list[Grant]]  # each sorted by acknowledgement time
    overlaps: int
    order_violations: int
    notes: list[str]


def check_history(grants: list[Grant], end: float) -> HistoryCheck:
    """Per lock name: fencing tokens must strictly increase in acknowledgement order, and
    no grant may be acknowledged while another grant of the name is known to be held
    (from its acknowledgement until its release was sent, or its lease could end).
    end closes the interval of a grant that was never released."""
    by_name: dict[str, list[Grant]] = {}
    for grant in grants:
        by_name.setdefault(grant.name, []).append(grant)
    check = HistoryCheck(by_name, 0, 0, [])
    for name, ordered in by_name.items():
        ordered.sort(key=lambda g: g.acked_at)
        for prev, cur in itertools.pairwise(ordered):
            if cur.token <= prev.token:
                check.order_violations += 1
                if check.order_violations <= 5:
                    check.notes.append(
                        f"{name}: token {cur.token} ({cur.owner}) acknowledged after "
                        f"token {prev.token} ({prev.owner})"
                    )
        latest: Grant | None = None  # the earlier grant whose interval reaches furthest
        for grant in ordered:
            if latest is not None and grant.acked_at < latest.held_until(end):
                check.overlaps += 1
                if check.overlaps <= 5:
                    check.notes.append(
                        f"{name}: {grant.owner} acknowledged at {grant.acked_at:.3f} while "
                        f"{latest.owner} held it until {latest.held_until(end):.3f}"
                    )
            if latest is None or grant.held_until(end) > latest.held_until(end):
                latest = grant
    return check


# --- helpers -------------------------------------------------------------------------


def _holders(reply: Reply | None) -> set[tuple[str, int]] | None:
    """(owner, token) of every holder; empty when not held; None when unreadable."""
    if reply is None:
        return None
    if reply.status == 404:
        return set()
    if reply.status != 200:
        return None
    holders = reply.body.get("holders")
    if not isinstance(holders, list):
        return None
    return {(str(h.get("owner")), int(h.get("token", -1))) for h in holders if isinstance(h, dict)}


def _usage(message: str) -> int:
    _say(f"drill: {message}")
    return 2


def _say(line: str) -> None:
    print(line, flush=True)
