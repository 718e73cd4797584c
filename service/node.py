"""One dsync node: its Redis, its Raft runner, its services and its HTTP server.

Start order matters: Redis (and migrations) first, so the node can load what it persisted;
then the HTTP server, so /health answers while peers that were listed by bare URL are asked
for their ids; then Raft. Stop order is the reverse, after leadership is handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from service.api.http import STREAMS_KEY
from service.cache.mirror_store import RedisMirrorStore
from service.cache.service import CacheService
from service.cache.store import RedisCacheStore
from service.config import ConfigError, Settings, resolve_peer_ids
from service.dedup import Deduplicated, DedupTable
from service.gc_policy import GcFreezer, GcPauseRecorder, YoungThreshold
from service.kv.machine import KvStateMachine
from service.locks.service import LockService
from service.loop_lag import LoopLagMonitor
from service.machines import MachineRegistry
from service.metrics import NodeMetrics, PeerTraffic
from service.queue.service import QueueService
from service.queue.store import RedisPartitionStore
from service.raft.core import ABSTAIN, RaftConfig, RaftCore, Role
from service.raft.messages import HardState
from service.raft.rejoin import REJOIN_KEY, ask_health, term_floor
from service.raft.runner import RaftRunner, decode_snapshot_data
from service.statemachine import StateMachine
from service.storage.client import redis_client
from service.storage.embedded import EmbeddedRedis
from service.storage.migrate import migrate
from service.storage.redis_store import RedisRaftStorage, RedisStateStore
from service.transport.calls import CallBatcher
from service.transport.forward import LeaderClient
from service.transport.http import HttpTransport
from service.transport.sessions import client_session

log = logging.getLogger("dsync.node")

# Batches a node keeps in flight to one peer, per call lane (CallBatcher). A blocking
# lock wait holds its batch for as long as it waits, so a cap on the "wait" lane is a
# cap on the clients waiting through this node: past it (it was 512 batches) later
# waiters stayed queued here, out of the lock's FIFO queue, until earlier ones were
# granted, and a holder waiting on one of them could never release. Each wait is an
# HTTP request here and a task on the leader either way: the lane is not capped.
CALL_LANE_LIMITS = {"wait": 1_000_000_000}

REDIS_LOADING_TIMEOUT_SECONDS = 120.0
HTTP_KEEPALIVE_SECONDS = 75.0
# Connections the kernel completes and queues until the node accepts them. aiohttp's
# default, 128, is overrun when hundreds of clients connect at once (after a failover, or
# a burst of blocking lock waiters while the loop is busy): the kernel then drops their
# SYNs, and each retries only after 1, 3, 7, 15 s. Capped by net.core.somaxconn.
HTTP_LISTEN_BACKLOG = 1024


def http_site(runner: web.AppRunner, host: str, port: int) -> web.TCPSite:
    """The node's listening socket for clients and peers."""
    return web.TCPSite(runner, host, port, backlog=HTTP_LISTEN_BACKLOG)


class StartupError(Exception):
    """The node cannot start; the message is one line for the operator."""


@dataclass
class Node:
    settings: Settings
    metrics: NodeMetrics = field(init=False)
    redis: aioredis.Redis | None = None
    embedded: EmbeddedRedis | None = None
    storage: RedisRaftStorage | None = None
    state: RedisStateStore | None = None
    runner: RaftRunner | None = None
    transport: HttpTransport | None = None
    forwarder: LeaderClient | None = None
    calls: CallBatcher | None = None
    kv: KvStateMachine = field(default_factory=KvStateMachine)
    # request_id -> result of every command that carried one (exactly-once retries).
    dedup: DedupTable = field(default_factory=DedupTable)
    locks: LockService | None = None
    queues: QueueService | None = None
    cache: CacheService | None = None
    peer_urls: dict[str, str] = field(default_factory=dict)
    services: list[Any] = field(default_factory=list)
    _site_runner: web.AppRunner | None = None
    _rejoin_task: asyncio.Future[None] | None = None
    _known_leader: str | None = None  # the Raft leader last seen by _leader_changed
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    loop_lag: LoopLagMonitor = field(init=False)
    gc_pauses: GcPauseRecorder = field(init=False)
    gc_freezer: GcFreezer | None = None
    gc_young: YoungThreshold | None = None

    def __post_init__(self) -> None:
        self.metrics = NodeMetrics(self.settings.node_id)
        self.loop_lag = LoopLagMonitor(
            self.metrics.event_loop_lag_seconds.labels(self.settings.node_id)
        )
        pauses = self.metrics.gc_pause_seconds
        node_id = self.settings.node_id
        self.gc_pauses = GcPauseRecorder(
            lambda generation, seconds: pauses.labels(node_id, str(generation)).observe(seconds)
        )
        self.metrics.track_peer_traffic(self.peer_traffic)

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    def peer_traffic(self) -> PeerTraffic | None:
        """The peer transport's counters and open sockets (None before Raft starts)."""
        transport = self.transport
        if transport is None:
            return None
        stats = transport.stats
        raft_out, raft_in = transport.open_sockets()
        streams = self._site_runner.app.get(STREAMS_KEY) if self._site_runner else None
        calls_in = len(streams) if streams is not None else 0
        calls_out = self.calls.open_streams() if self.calls is not None else 0
        return PeerTraffic(
            raft_sent=stats.sent,
            raft_dropped=stats.dropped,
            raft_received=stats.received,
            raft_rejected=stats.rejected,
            raft_send_failures=stats.failed_requests,
            sockets={
                "raft_out": raft_out,
                "raft_in": raft_in,
                "calls_out": calls_out,
                "calls_in": calls_in,
            },
        )

    @property
    def self_url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.settings.port}"

    # --- start ------------------------------------------------------------------

    async def start(self, app_factory: Any) -> None:
        self.loop_lag.start()
        self.gc_pauses.start()
        await self._start_redis()
        assert self.redis is not None
        await migrate(self.redis)
        self.storage = RedisRaftStorage(self.redis)
        self.state = RedisStateStore(self.redis)
        await self._start_http(app_factory)
        settings = self.settings
        if settings.mode == "single":
            peers: dict[str, str] = {}
        else:
            try:
                settings = await resolve_peer_ids(settings)
            except ConfigError as exc:
                raise StartupError(str(exc)) from exc
            self.settings = settings
            peers = {p.node_id: p.url for p in settings.peers if p.node_id is not None}
        self.peer_urls = peers
        await self._start_raft(tuple(sorted([self.node_id, *peers])))
        if settings.gc_refreeze_seconds > 0:
            # After the state is loaded: what survives a collection now lives long.
            self.gc_freezer = GcFreezer(settings.gc_refreeze_seconds)
            self.gc_freezer.start()
        if settings.gc_young_threshold > 0:
            self.gc_young = YoungThreshold(settings.gc_young_threshold)
            self.gc_young.apply()
        self.metrics.gc_young_threshold.labels(self.node_id).set(gc.get_threshold()[0])
        log.info(
            "node started",
            extra={"url": self.self_url, "peers": peers, "mode": settings.mode},
        )

    async def _start_redis(self) -> None:
        settings = self.settings
        url = settings.redis_url
        if url is None:
            self.embedded = EmbeddedRedis(settings.data_dir, settings.redis_port)
            try:
                await self.embedded.start()
            except Exception as exc:
                raise StartupError(f"embedded redis-server: {exc}") from exc
            self.embedded.supervise()
            url = self.embedded.url
        self.redis = redis_client(
            url, socket_timeout=10, socket_connect_timeout=3, health_check_interval=30
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REDIS_LOADING_TIMEOUT_SECONDS
        while True:
            try:
                await self.redis.ping()
                return
            except redis.exceptions.BusyLoadingError:
                # A Redis restarted with a large AOF answers LOADING until it has read it.
                if loop.time() >= deadline:
                    raise StartupError(
                        f"REDIS_URL: Redis at {_redact(url)} is still loading its data "
                        f"after {REDIS_LOADING_TIMEOUT_SECONDS:g} s"
                    ) from None
                await asyncio.sleep(0.1)
            except (redis.exceptions.RedisError, OSError) as exc:
                raise StartupError(
                    f"REDIS_URL: cannot reach Redis at {_redact(url)}: {exc}"
                ) from exc

    async def _start_http(self, app_factory: Any) -> None:
        app = app_factory(self)
        # keepalive_timeout also closes a connection that opened and never finished its
        # request headers; aiohttp's own default (3630 s) would let slow or stuck clients
        # pile up connections for an hour. 75 s is what aiohttp's run_app and nginx use.
        self._site_runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                          keepalive_timeout=HTTP_KEEPALIVE_SECONDS)
        await self._site_runner.setup()
        site = http_site(self._site_runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"PORT: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from exc

    def state_machines(self) -> list[StateMachine]:
        """Every machine the runner applies to, each wrapped so a command retried with
        the same request_id applies once; the dedup table itself is one of them."""
        inner: list[StateMachine] = [self.kv]
        for service in self.services:
            inner.extend(service.state_machines())
        machines: list[StateMachine] = [
            Deduplicated(m, self.dedup, _namespace(m.prefix)) for m in inner
        ]
        machines.append(self.dedup)
        return machines

    async def _start_raft(self, voters: tuple[str, ...]) -> None:
        assert self.storage is not None and self.state is not None
        settings = self.settings
        registry = MachineRegistry(self.state_machines())
        hard_state = await self.storage.load_hard_state()
        snapshot = await self.storage.load_snapshot()
        first, last = await self.storage.first_index(), await self.storage.last_index()
        entries = await self.storage.entries(first, last + 1)
        applied = await self.state.load_applied_index()
        if snapshot is not None and applied < snapshot.meta.index:
            # A crash came between persisting a received snapshot and materialising it.
            hashes = decode_snapshot_data(snapshot.data)
            await self.state.replace_all(registry.prefixes, hashes, snapshot.meta.index)
            applied = snapshot.meta.index
        else:
            hashes = {}
            for prefix in registry.prefixes:
                hashes.update(await self.state.load_prefix(prefix))
        registry.load(hashes)
        fresh = hard_state == HardState() and snapshot is None and last == 0 and applied == 0
        hard_state, rejoining = await self._check_lost_storage(hard_state, fresh)
        config = RaftConfig(
            election_ticks=settings.election_ticks, heartbeat_ticks=settings.heartbeat_ticks
        )
        core = RaftCore(
            self.node_id,
            voters,
            random.Random(),
            config,
            hard_state=hard_state,
            snapshot=snapshot,
            entries=entries,
            applied=applied,
            rejoining=rejoining,
        )
        log.info(
            "loaded raft state",
            extra={
                "term": hard_state.term,
                "vote": hard_state.vote,
                "log_first": first,
                "log_last": last,
                "applied": applied,
                "snapshot": snapshot.meta.index if snapshot else 0,
            },
        )
        self.runner = RaftRunner(
            core,
            self.storage,
            self.state,
            registry,
            self.metrics,
            tick_seconds=settings.tick_ms / 1000,
            snapshot_threshold=settings.snapshot_threshold,
            retryable_errors=(
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                OSError,
            ),
        )
        self.transport = HttpTransport(
            self.node_id,
            self.peer_urls,
            self.runner.deliver,
            secret=settings.cluster_secret,
        )
        self.runner.transport = self.transport
        # Few, quick connection retries: when the leader is unreachable the API layer
        # waits for the next election and forwards there instead.
        self.forwarder = LeaderClient(
            self.node_id,
            secret=settings.cluster_secret,
            connect_timeout=0.5,
            max_attempts=2,
            retry_deadline=0.25,
            connections_per_host=128,
        )
        batch_sizes = self.metrics.peer_call_batch_calls
        self.calls = CallBatcher(
            self.node_id,
            secret=settings.cluster_secret,
            lane_limits=CALL_LANE_LIMITS,
            on_batch=lambda lane, calls: batch_sizes.labels(self.node_id, lane).observe(calls),
        )
        await self.transport.start()
        if self.queues is not None:
            assert self.redis is not None
            self.queues.store = RedisPartitionStore(self.redis)
            self.queues.peer_urls = dict(self.peer_urls)
            self.queues.secret = settings.cluster_secret
            self.queues.calls = self.calls
        if self.cache is not None:
            assert self.redis is not None
            self.cache.peer_urls = dict(self.peer_urls)
            self.cache.secret = settings.cluster_secret
            self.cache.calls = self.calls
            self.cache.keep_mirrors(RedisCacheStore(self.redis), RedisMirrorStore(self.redis))
        for service in self.services:
            service.attach(self.runner)
        self.runner.add_role_listener(self._leader_changed)
        self.runner.start()

    async def _check_lost_storage(
        self, hard_state: HardState, fresh: bool
    ) -> tuple[HardState, bool]:
        """Empty Raft storage in a cluster that has a log: this node lost its storage and
        comes back as service/raft/rejoin.py explains. Returns the hard state to start
        from and whether the core starts rejoining."""
        assert self.redis is not None and self.storage is not None
        marked = bool(await self.redis.exists(REJOIN_KEY))
        if fresh and self.peer_urls:
            async with client_session() as session:
                floor = await term_floor(
                    self.peer_urls, functools.partial(ask_health, session)
                )
            if floor is not None or marked:
                # The marker first: a crash between the two writes must not leave a hard
                # state that looks like an ordinary one.
                await self.redis.set(REJOIN_KEY, "1")
                hard_state = HardState(floor or 0, ABSTAIN)
                await self.storage.save_hard_state(hard_state)
                marked = True
                log.warning(
                    "Raft storage was lost: rejoining, with no vote until caught up",
                    extra={"term": hard_state.term},
                )
        if marked:
            self._spawn_rejoin_watch()
            if self.queues is not None:
                self.queues.storage_lost = True
        return hard_state, marked

    def _leader_changed(self, role: Role, term: int, leader: str | None) -> None:
        """A peer that stopped leading is suspect: calls in flight to it (forwarded
        writes) must not wait out their timeout if it is cut off (see CallBatcher.probe)."""
        previous, self._known_leader = self._known_leader, leader
        if previous is None or previous in (leader, self.node_id) or self.calls is None:
            return
        url = self.peer_urls.get(previous)
        if url is not None:
            self.calls.probe(url)

    def _spawn_rejoin_watch(self) -> None:
        async def watch() -> None:
            while self.runner is None or self.runner.core.rejoining:
                await asyncio.sleep(0.2)
            assert self.redis is not None
            await self.redis.delete(REJOIN_KEY)
            log.info("caught up after lost storage: voting again")

        self._rejoin_task = asyncio.ensure_future(watch())

    # --- queries used by the API -------------------------------------------------

    def leader_url(self) -> str | None:
        if self.runner is None:
            return None
        leader = self.runner.core.leader
        if leader is None or leader == self.node_id:
            return None
        return self.peer_urls.get(leader)

    def is_leader(self) -> bool:
        return self.runner is not None and self.runner.core.role == Role.LEADER

    async def wait_for_leader(self, timeout: float, other_than: str | None = None) -> str | None:
        """The leader's id, waiting up to timeout for an election to finish (and, with
        other_than, for a leader other than one found unreachable)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            leader = self.runner.core.leader if self.runner is not None else None
            if leader is not None and leader != other_than:
                return leader
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.02)

    # --- stop -------------------------------------------------------------------

    async def stop(self) -> None:
        """Graceful shutdown: hand leadership to the most caught-up peer, then stop."""
        runner = self.runner
        if runner is not None and runner.core.role == Role.LEADER and self.peer_urls:
            target = _best_transfer_target(runner)
            if target is not None:
                with contextlib.suppress(Exception):
                    await runner.transfer_leadership(target, timeout=2.0)
                    log.info("leadership transferred", extra={"to": target})
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.stop()
        if self._rejoin_task is not None:
            self._rejoin_task.cancel()
        if runner is not None:
            try:
                await runner.stop()
            except Exception:
                # Whatever it was, the rest of the shutdown must still run.
                log.exception("raft runner did not stop cleanly")
        if self.transport is not None:
            await self.transport.close()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.calls is not None:
            await self.calls.close()
        if self._site_runner is not None:
            await self._site_runner.cleanup()
        if self.redis is not None:
            await self.redis.aclose()
        if self.embedded is not None:
            await self.embedded.stop()
        if self.gc_freezer is not None:
            await self.gc_freezer.stop()
        if self.gc_young is not None:
            self.gc_young.restore()
        await self.gc_pauses.stop()
        await self.loop_lag.stop()
        self._stopped.set()


def _best_transfer_target(runner: RaftRunner) -> str | None:
    progress = runner.core.status().progress
    if not progress:
        return None
    return max(progress, key=lambda peer: (progress[peer][0], peer))


def _namespace(prefix: str) -> str:
    # "dsync:lock:" -> "lock": request ids are unique within one service's namespace.
    return prefix.removeprefix("dsync:").strip(":")


def _redact(url: str) -> str:
    # Never print a password from REDIS_URL.
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
