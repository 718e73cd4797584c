"""The cache service: runs this node's line cache and directory, persists, sends, answers.

The protocol lives in the sans-IO cores (`recovery.RecoveringLineCache` and
`recovery.RecoveringDirectory`, on top of `lines.py` and `directory.py`); this module and
`pipeline.py` are the only places that do I/O for them, in the order their actions
require:

    persist (Redis MULTI, grouped)  ->  send  ->  answer clients

The cores are stepped synchronously on the event loop (a step takes microseconds); their
actions go to the `Pipeline`, which groups the persists of everything ready into one
MULTI and lets nothing about a key go out before that key's earlier persists are durable
(what makes a reloaded line or directory entry trustworthy after kill -9).

The read-hit fast path skips the pipeline: a local read the line cache serves at once
(a valid M/E line, or an S line within its lease) is answered straight from memory, with
no network or Redis round trip, unless a write of that line is still on its way to
Redis (then the answer waits behind it, so nobody reads what a crash could take back).

Homes are fixed by `placement.home_node(key, sorted Raft voters)`: while a key's home is
down, reads and writes that need it answer 503 `unavailable` (they are not re-homed: the
directory state lives on the home). Messages to peers go through one `PeerLink` each
(batched, retried, deduplicated); the cores re-send what a crash may have lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack

from service.cache import report, wire
from service.cache.errors import CacheError, unavailable
from service.cache.eviction import PolicyName
from service.cache.links import PeerLink
from service.cache.messages import (
    Action,
    FwdDone,
    GetM,
    GetS,
    Inv,
    InvAck,
    LocalDelete,
    LocalRead,
    LocalWrite,
    Message,
    PutE,
    PutM,
    PutS,
    ReadDone,
    Send,
    Unblock,
    WriteDone,
)
from service.cache.mirror_store import (
    Applied,
    MirrorImage,
    MirrorStore,
    MirrorUpdate,
    decode_position,
    encode_position,
)
from service.cache.mirrored import MirroredCacheStore, MirrorUnavailable
from service.cache.pipeline import Pipeline
from service.cache.recovery import RecoveringDirectory, RecoveringLineCache
from service.cache.starts import STARTED, CacheStartsMachine
from service.cache.store import CacheStore, LocalCacheStore, Persist
from service.cache.values import Json
from service.clock import now_ms
from service.metrics import NodeMetrics
from service.placement import home_node
from service.raft.core import Role
from service.raft.runner import RaftRunner
from service.statemachine import Command, StateMachine
from service.transport.calls import CallBatcher
from service.transport.http import FROM_HEADER, SECRET_HEADER
from service.transport.sessions import client_session

log = logging.getLogger("dsync.cache")

INTERNAL = "/internal/v1/cache"
MSGPACK = "application/msgpack"
HOME_MESSAGES = (GetS, GetM, PutS, PutE, PutM, InvAck, FwdDone, Unblock)
TICK_SECONDS = 0.05
# A batch of protocol messages unanswered this long makes its peer suspect (see
# _probe_stalled_peers); a live peer answers one within milliseconds.
STALLED_POST_SECONDS = 1.0
METRICS_SECONDS = 1.0
RPC_TIMEOUT_SECONDS = 2.0
INSPECT_TIMEOUT_SECONDS = 1.0
DOWN_FAST_FAIL_SECONDS = 1.0  # a home unreachable this long: fail its misses quickly
FAST_FAIL_TIMEOUT_SECONDS = 0.3
START_ATTEMPTS = 300  # about ten minutes of retries while Redis is unreachable
REQ_ID_SPACE = 1 << 40  # request ids per incarnation (see RecoveringLineCache.req_base)
INV_TIMER_TTL_SECONDS = 60.0
REGISTER_LEADER_WAIT_SECONDS = 5.0
FETCH_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_value_bytes: int = 256 * 1024  # largest value a PUT may store (JSON text)
    policy: PolicyName = "lru"
    lease_ms: int = 5_000  # how long a shared copy serves reads without asking the home
    resend_ms: int = 1_000  # re-send outstanding requests, forwards, grants after this
    read_timeout_ms: int = 3_000
    write_timeout_ms: int = 7_000  # > lease_ms: a silent sharer holds a write one lease
    max_pending_ops: int = 10_000  # client operations waiting at once; more get 429


class CacheService:
    def __init__(
        self,
        node_id: str,
        metrics: NodeMetrics,
        store: CacheStore,
        settings: CacheSettings | None = None,
    ) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.store = store
        self.settings = settings or CacheSettings()
        self.peer_urls: dict[str, str] = {}
        self.secret: str | None = None
        self.calls: CallBatcher | None = None
        # The copies of the peers' stores; None until this node's Redis is up (a mirror
        # that is not loaded must never answer "I hold nothing").
        self.mirrors: MirrorStore | None = None
        self.starts = CacheStartsMachine()
        self._start_id = uuid.uuid4().hex  # the request id of this process's start record
        self.runner: RaftRunner | None = None
        self.members: tuple[str, ...] = (node_id,)
        self.lines: RecoveringLineCache | None = None
        self.directory: RecoveringDirectory | None = None
        self._links: dict[str, PeerLink] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pipeline = Pipeline(self._persist, self._dispatch)
        self._ops: dict[int, asyncio.Future[ReadDone | WriteDone]] = {}
        self._op_ids = itertools.count(1)
        self._inv_started: dict[tuple[str, str, int], float] = {}
        self.inv_latencies: collections.deque[float] = collections.deque(maxlen=4_096)
        self.reported: dict[str, int] = {}  # counter values already given to Prometheus
        self._stopping = False
        self.invalidations = 0

    # --- wiring ------------------------------------------------------------------------

    def state_machines(self) -> list[StateMachine]:
        # Only the record of which caches ever started goes through the log (starts.py).
        return [self.starts]

    def keep_mirrors(self, local: LocalCacheStore, mirrors: MirrorStore) -> None:
        """Persist to `local` and to a peer (mirrored.py); keep the peers' copies in
        `mirrors`. Called by the node once its Redis is up, before attach."""
        self.mirrors = mirrors
        self.store = MirroredCacheStore(
            self.node_id,
            local,
            sorted(self.peer_urls),
            self._send_mirror,
            self._fetch_mirror,
            self._register,
        )

    def attach(self, runner: RaftRunner) -> None:
        self.runner = runner
        self.members = tuple(sorted(runner.core.voters))
        self._session = client_session(
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=8),
            timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT_SECONDS),
        )
        self._spawn(self._start())

    async def stop(self) -> None:
        self._stopping = True
        self._pipeline.stop()
        for link in self._links.values():
            link.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for future in self._ops.values():
            if not future.done():
                future.set_exception(unavailable("the node is shutting down"))
        if isinstance(self.store, MirroredCacheStore):
            await self.store.stop()
        if self._session is not None:
            await self._session.close()

    @property
    def ready(self) -> bool:
        return self.lines is not None and not self._stopping

    def home_of(self, key: str) -> str:
        return _home(key, self.members)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        """Reload lines and directory entries from Redis, then start serving."""
        backoff = 0.05
        for attempt in range(START_ATTEMPTS):
            try:
                incarnation = await self.store.next_incarnation()
                stored = await self.store.load()
                break
            except Exception as exc:
                log.warning(
                    "cache state not loaded yet", extra={"attempt": attempt, "error": repr(exc)}
                )
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
        else:
            log.error("cache state could not be loaded: the cache stays unavailable (503)")
            return
        s = self.settings
        lines = RecoveringLineCache(
            self.node_id,
            self.home_of,
            max_entries=s.max_entries,
            max_bytes=s.max_bytes,
            policy=s.policy,
            resend_ms=s.resend_ms,
            req_base=incarnation * REQ_ID_SPACE,
        )
        directory = RecoveringDirectory(self.node_id, lease_ms=s.lease_ms, resend_ms=s.resend_ms)
        now = now_ms()
        bad = 0
        for key, fields in stored.lines.items():
            try:
                lines.restore(key, fields)
            except ValueError as exc:
                bad += 1
                log.error("unreadable cache line skipped", extra={"key": key, "error": str(exc)})
        for key, fields in stored.entries.items():
            try:
                directory.restore(key, fields, now)
            except ValueError as exc:
                bad += 1
                log.error(
                    "unreadable directory entry skipped", extra={"key": key, "error": str(exc)}
                )
        self.lines, self.directory = lines, directory
        for peer in self.members:
            if peer != self.node_id:
                link = PeerLink(peer, self._post)
                self._links[peer] = link
                self._spawn(link.run())
        if isinstance(self.store, MirroredCacheStore):
            self.store.start()
        self._spawn(self._pipeline.run())
        self._spawn(self._ticker())
        self._feed(directory.retire_unused())
        self._feed(lines.recover())
        log.info(
            "cache started",
            extra={
                "lines": len(stored.lines),
                "entries": len(stored.entries),
                "unreadable": bad,
                "incarnation": incarnation,
                "members": list(self.members),
            },
        )

    # --- client operations -------------------------------------------------------------

    async def read(self, key: str) -> ReadDone:
        lines = self._lines()
        op = next(self._op_ids)
        actions = lines.step(LocalRead(op, key), now_ms())
        if len(actions) == 1 and not self._pipeline.busy(key):
            done = actions[0]
            if isinstance(done, ReadDone):
                return done  # a hit: no Redis, no network, nothing pending on the key
        result = await self._wait(op, key, actions, self.settings.read_timeout_ms)
        assert isinstance(result, ReadDone)
        return result

    async def write(self, key: str, value: Json) -> WriteDone:
        return await self._write(key, LocalWrite(next(self._op_ids), key, value))

    async def delete(self, key: str) -> WriteDone:
        return await self._write(key, LocalDelete(next(self._op_ids), key))

    async def _write(self, key: str, event: LocalWrite | LocalDelete) -> WriteDone:
        lines = self._lines()
        actions = lines.step(event, now_ms())
        result = await self._wait(event.op, key, actions, self.settings.write_timeout_ms)
        assert isinstance(result, WriteDone)
        return result

    def _lines(self) -> RecoveringLineCache:
        if self.lines is None or self._stopping:
            raise unavailable("the cache is starting or stopping on this node; retry shortly")
        if len(self._ops) >= self.settings.max_pending_ops:
            raise CacheError(429, "too_busy", "too many cache operations waiting; retry")
        return self.lines

    async def _wait(
        self, op: int, key: str, actions: list[Action], timeout_ms: int
    ) -> ReadDone | WriteDone:
        future: asyncio.Future[ReadDone | WriteDone] = asyncio.get_running_loop().create_future()
        self._ops[op] = future
        self._feed(actions)
        timeout = timeout_ms / 1000
        home = self.home_of(key)
        link = self._links.get(home)
        down_since = link.down_since if link is not None else None
        if down_since is not None and time.monotonic() - down_since > DOWN_FAST_FAIL_SECONDS:
            timeout = min(timeout, FAST_FAIL_TIMEOUT_SECONDS)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise unavailable(
                f"no answer within {timeout:g} s: the key's home ({home}) or its current "
                "owner is unreachable; a write's outcome is unknown, retry"
            ) from None
        finally:
            self._ops.pop(op, None)

    # --- protocol messages -------------------------------------------------------------

    def receive(self, sender: str, messages: Sequence[Message]) -> None:
        """Step a batch a peer sent; its effects go through the pipeline like any other."""
        for message in messages:
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        lines, directory = self.lines, self.directory
        if lines is None or directory is None:
            return
        now = now_ms()
        if isinstance(message, HOME_MESSAGES):
            if isinstance(message, InvAck):
                started = self._inv_started.pop((message.key, message.sender, message.txn), None)
                if started is not None:
                    elapsed = time.perf_counter() - started
                    self.inv_latencies.append(elapsed)
                    self.metrics.cache_invalidation_seconds.labels(self.node_id).observe(elapsed)
            self._feed(directory.step(message, now))
        else:
            self._feed(lines.step(message, now))

    # --- the pipeline ------------------------------------------------------------------

    def _feed(self, actions: list[Action]) -> None:
        self._pipeline.feed(actions)

    async def _persist(self, persists: list[Persist]) -> None:
        await self.store.persist(persists)  # the node may swap the store before attach

    def _dispatch(self, action: Action) -> None:
        if isinstance(action, Send):
            message = action.message
            if isinstance(message, Inv):
                timer = (message.key, action.to, message.txn)
                if timer not in self._inv_started:
                    self._inv_started[timer] = time.perf_counter()
                    self.invalidations += 1
                    self.metrics.cache_invalidations.labels(self.node_id).inc()
            if action.to == self.node_id:
                self._deliver(message)
                return
            link = self._links.get(action.to)
            if link is None:
                log.warning("cache message to an unknown node dropped", extra={"to": action.to})
                return
            link.put(message)
        elif isinstance(action, ReadDone | WriteDone):
            future = self._ops.pop(action.op, None)
            if future is not None and not future.done():
                future.set_result(action)

    async def _ticker(self) -> None:
        last_metrics = 0.0
        while not self._stopping:
            await asyncio.sleep(TICK_SECONDS)
            lines, directory = self.lines, self.directory
            if lines is None or directory is None:
                continue
            try:
                now = now_ms()
                self._feed(directory.tick(now))
                self._feed(lines.tick(now))
                self._probe_stalled_peers()
                if time.monotonic() - last_metrics >= METRICS_SECONDS:
                    last_metrics = time.monotonic()
                    self.update_metrics()
                    self._prune_inv_timers()
            except Exception:
                log.exception("cache tick failed")

    def _probe_stalled_peers(self) -> None:
        """A peer that has left a batch unanswered for STALLED_POST_SECONDS may be cut
        off: have its sockets answer a ping, or be closed (CallBatcher.probe). The post
        then fails at once, the link counts the peer as down, and operations that need it
        answer 503 quickly instead of each waiting out its bound (7 s for a write)."""
        if self.calls is None:
            return
        now = time.monotonic()
        for peer, link in self._links.items():
            url = self.peer_urls.get(peer)
            if url is not None and link.stalled_for(now) > STALLED_POST_SECONDS:
                self.calls.probe(url)

    def _prune_inv_timers(self) -> None:
        cutoff = time.perf_counter() - INV_TIMER_TTL_SECONDS
        for timer in [t for t, at in self._inv_started.items() if at < cutoff]:
            del self._inv_started[timer]  # dropped by lease expiry; never acked

    # --- peers -------------------------------------------------------------------------

    async def _post(self, peer: str, messages: list[Message]) -> None:
        """Hand a batch of the outbox to the peer; returns once it stepped them."""
        status, body = await self._peer_call(
            peer, "cache.messages", {"m": [wire.encode(m) for m in messages]}, "cache"
        )
        if status != 200:
            raise aiohttp.ClientError(f"{peer} answered {status} to cache messages: {body!r:.200}")

    async def _peer_call(
        self, peer: str, name: str, args: dict[str, Any], lane: str, timeout: float | None = None
    ) -> tuple[int, Any]:
        url = self.peer_urls.get(peer)
        if url is None or self.calls is None:
            raise MirrorUnavailable(f"no address for {peer}")
        return await self.calls.call(url, name, args, lane=lane, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": MSGPACK, FROM_HEADER: self.node_id}
        if self.secret:
            headers[SECRET_HEADER] = self.secret
        return headers

    # --- mirrors of the cache store (mirrored.py) ---------------------------------------

    async def _send_mirror(self, peer: str, update: MirrorUpdate) -> Applied:
        args = {
            "position": encode_position(update.position),
            "base": None if update.base is None else encode_position(update.base),
            "writes": dict(update.writes),
            "part": update.part,
            "last": update.last,
        }
        status, body = await self._peer_call(peer, "cache.mirror", args, "mirror")
        if status != 200 or not isinstance(body, dict):
            raise MirrorUnavailable(f"{peer} answered {status} to a mirror update")
        at = body.get("position")
        return Applied(bool(body.get("applied")), decode_position(at) if at else None)

    async def _fetch_mirror(self, peer: str) -> MirrorImage | None:
        # A whole mirror in one answer (a restore is rare): give it time.
        status, body = await self._peer_call(
            peer, "cache.mirror_image", {}, "mirror", timeout=FETCH_TIMEOUT_SECONDS
        )
        if status != 200 or not isinstance(body, dict):
            raise MirrorUnavailable(f"{peer} answered {status} to a mirror fetch")
        if body.get("position") is None:
            return None
        position = decode_position(body["position"])
        assert position is not None
        return MirrorImage(position, dict(body["writes"]))

    def _mirrors(self) -> MirrorStore:
        if self.mirrors is None:
            raise unavailable("this node's Redis is not up yet")
        return self.mirrors

    async def mirror_answer(self, source: str, update: MirrorUpdate) -> dict[str, Any]:
        applied = await self._mirrors().apply(source, update)
        at = applied.position
        return {"applied": applied.applied, "position": None if at is None else encode_position(at)}

    async def mirror_image(self, source: str) -> dict[str, Any]:
        image = await self._mirrors().image(source)
        if image is None:
            return {"position": None}
        return {"position": encode_position(image.position), "writes": dict(image.writes)}

    async def _register(self) -> bool:
        """Record this node's cache start in the Raft log; True if recorded before."""
        runner = self.runner
        if runner is None:
            raise MirrorUnavailable("Raft is not running yet")
        deadline = time.monotonic() + REGISTER_LEADER_WAIT_SECONDS
        while (leader := runner.core.leader) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if leader is None:
            raise MirrorUnavailable("no Raft leader to record the cache start with")
        if leader == self.node_id:
            result = await self.record_start(self.node_id, self._start_id)
        else:
            status, result = await self._peer_call(
                leader, "cache.register", {"request_id": self._start_id}, "control"
            )
            if status != 200 or not isinstance(result, dict):
                raise MirrorUnavailable(f"leader {leader} answered {status} to the start record")
        return bool(result["before"])

    async def record_start(self, node: str, request_id: str) -> dict[str, Any]:
        """On the Raft leader: commit `node`'s cache start (once per request id)."""
        runner = self.runner
        if runner is None or runner.core.role != Role.LEADER:
            raise MirrorUnavailable("not the Raft leader")
        command = Command(STARTED, {"node": node}, request_id=request_id)
        return dict(await runner.propose(command, RPC_TIMEOUT_SECONDS))

    # --- inspection and metrics --------------------------------------------------------

    def inspect_local(self, key: str) -> dict[str, Any]:
        """This node's line for `key` and, if it is the key's home, the directory entry."""
        return report.line_view(self, key)

    async def inspect(self, key: str) -> dict[str, Any]:
        """Every node's line for `key` and the directory entry from its home."""
        home = self.home_of(key)
        views = await asyncio.gather(*(self._inspect_on(node, key) for node in self.members))
        lines: dict[str, Any] = {}
        entry: dict[str, Any] = {"error": "unavailable", "message": f"{home} did not answer"}
        for node, view in zip(self.members, views, strict=True):
            if view is None:
                lines[node] = {"state": None, "error": "unavailable"}
                continue
            found = view.pop("directory", None)
            view.pop("node", None)
            lines[node] = view
            if node == home and found is not None:
                entry = found
        return {"key": key, "home": home, "lines": lines, "directory": entry}

    async def _inspect_on(self, node: str, key: str) -> dict[str, Any] | None:
        if node == self.node_id:
            return self.inspect_local(key)
        return await self._ask(node, "inspect", {"key": key})

    async def describe_cluster(self) -> dict[str, Any]:
        """Every member's describe(), and totals of the counts that add up."""
        views = await asyncio.gather(*(self._describe_on(node) for node in self.members))
        nodes: dict[str, Any] = {}
        for node, view in zip(self.members, views, strict=True):
            nodes[node] = view if view is not None else {"error": "unavailable"}
        return {"nodes": nodes, "totals": report.totals([v for v in views if v is not None])}

    async def _describe_on(self, node: str) -> dict[str, Any] | None:
        if node != self.node_id:
            return await self._ask(node, "describe", {})
        try:
            return self.describe()
        except CacheError:
            return None  # still starting

    async def _ask(self, node: str, route: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """A read-only question to a peer's cache; None when it does not answer."""
        url = self.peer_urls.get(node)
        if url is None or self._session is None:
            return None
        try:
            async with self._session.post(
                f"{url}{INTERNAL}/{route}",
                data=msgpack.packb(body, use_bin_type=True),
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=INSPECT_TIMEOUT_SECONDS),
            ) as response:
                raw = await response.read()
                if response.status != 200:
                    return None
                view = msgpack.unpackb(raw, raw=False)
                return view if isinstance(view, dict) else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None

    def update_metrics(self) -> None:
        report.update_metrics(self)

    def describe(self) -> dict[str, Any]:
        """This node's cache: capacity, size, hit ratio, lines per state, protocol counts."""
        return report.describe(self)

    def outbox(self) -> dict[str, int]:
        """Messages queued for each peer."""
        return {peer: len(link) for peer, link in sorted(self._links.items())}

    @property
    def persist_batches(self) -> int:
        return self._pipeline.persist_batches


@functools.lru_cache(maxsize=65_536)
def _home(key: str, members: tuple[str, ...]) -> str:
    return home_node(key, members)


__all__ = ["INTERNAL", "MSGPACK", "CacheError", "CacheService", "CacheSettings"]
