"""Shared state and plumbing of the queue service: constants, errors, the replicas this
node holds, node-to-node RPC and metadata proposals. The service proper
(`service.py`), replication (`replication.py`) and control (`control.py`) build on it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from service.metrics import NodeMetrics
from service.queue.meta import QueueMetaMachine
from service.queue.replica import GroupFlusher, NotPartitionLeader, PartitionReplica
from service.queue.store import PartitionStore
from service.queue.waiters import MessageWaiters
from service.raft.core import RaftError, Role
from service.raft.runner import RaftRunner
from service.statemachine import Command
from service.transport.calls import CallBatcher
from service.transport.forward import ForwardError

log = logging.getLogger("dsync.queue")

PUBLISH_TIMEOUT_SECONDS = 5.0
REPLICATE_TIMEOUT_SECONDS = 2.0
RPC_TIMEOUT_SECONDS = 3.0
MAX_OPS_PER_ITEM = 5_000
# A follower behind for this long leaves the ISR (publishes stop waiting for it).
ISR_LAG_SECONDS = 1.0
# A node not heard from (Raft traffic) for this long has its partitions moved away.
DEAD_AFTER_SECONDS = 0.8
CONTROL_INTERVAL_SECONDS = 0.1
TRIM_INTERVAL_SECONDS = 1.0
# A long poll is woken by events: messages published or nacked here, an ack that frees a
# key, a delivery's visibility ending here (a timer), another node's watch answering. It
# also looks again after this long, in case an event was missed. Consumers used to look
# every 0.1 s and ask the other nodes every 0.5 s: 2,000 idle long polls cost the cluster
# a core.
LONG_POLL_SLICE_SECONDS = 2.0
# A node with consumers waiting on a queue keeps one watch open per other partition
# leader and group (the whole node's consumers share it): the leader answers it when
# messages may be deliverable to the group, or after this long.
WATCH_SECONDS = 10.0
# Watches of one leader are answered at most this often (a busy leader answers each at
# once); one that failed (the leader is down or moved) is retried after WATCH_RETRY_SECONDS.
WATCH_MIN_INTERVAL_SECONDS = 0.05
WATCH_RETRY_SECONDS = 0.5
# A partition leader that had nothing for a group is not asked again by this node for
# that long: with many consumers long-polling through a node, each asked every other
# leader at the start and the end of every poll, hundreds of calls a second that mostly
# came back empty (at 30 msgs/s, 32 consumers cost the cluster half a core).
REMOTE_EMPTY_SECONDS = 0.05
# How long a consume waits for another partition leader's answer before going on. (The
# deliveries in an answer that comes later reach no one and stay invisible until their
# visibility ends; they are not handed back.)
REMOTE_CONSUME_SECONDS = 1.0
HEARTBEAT_SECONDS = 0.2
# A follower node that answered no replication call for this long leaves the ISR.
PEER_DOWN_SECONDS = 0.7
# A watch is held by the leader for up to WATCH_SECONDS: the wait lane, never one that
# other calls queue behind.
_LANES = {"replicate": "replication", "propose": "control", "watch": "wait"}


class QueueError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Delivered:
    id: str
    receipt: str
    partition: int
    key: str | None
    body: str  # JSON text
    delivery_count: int

    def to_wire(self) -> list[Any]:
        return [self.id, self.receipt, self.partition, self.key, self.body, self.delivery_count]

    @staticmethod
    def from_wire(raw: Sequence[Any]) -> Delivered:
        return Delivered(str(raw[0]), str(raw[1]), int(raw[2]), raw[3], str(raw[4]), int(raw[5]))


def make_receipt(partition: int, offset: int, count: int) -> str:
    return f"{partition}.{offset}.{count}"


def parse_receipt(receipt: object) -> tuple[int, int, int]:
    if not isinstance(receipt, str):
        raise ValueError("a receipt is a string")
    parts = receipt.split(".")
    if len(parts) != 3 or not all(p.isdigit() and len(p) < 19 for p in parts):
        raise ValueError(f"malformed receipt {receipt[:64]!r}")
    partition, offset, count = (int(p) for p in parts)
    return partition, offset, count


class QueueServiceBase:
    def __init__(self, node_id: str, metrics: NodeMetrics, store: PartitionStore) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.store = store
        self.meta = QueueMetaMachine()
        self.runner: RaftRunner | None = None
        self.peer_urls: dict[str, str] = {}
        self.secret: str | None = None
        # Set by the node: node-to-node RPCs then share batched peer requests.
        self.calls: CallBatcher | None = None
        self.replicas: dict[tuple[str, int], PartitionReplica] = {}
        # The replicas this node leads (the replicas keep it): what replication, ISR
        # checks and trimming visit, so their cost follows the partitions led here,
        # not every partition of every queue (100 idle queues took 12% of a core).
        self.leading_replicas: dict[tuple[str, int], PartitionReplica] = {}
        self._loading: dict[tuple[str, int], asyncio.Future[PartitionReplica]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._reconcile_needed = asyncio.Event()
        self._counters: dict[str, int] = {}
        self._rotation = itertools.count()
        self._message_waiters = MessageWaiters()
        # (queue, group, leader) -> loop time until which that leader counts as empty
        self._remote_empty_until: dict[tuple[str, str, str], float] = {}
        # (queue, group, leader) of the watches open from this node
        self._watching: set[tuple[str, str, str]] = set()
        # (queue, group) -> (now_ms it fires at, timer): a delivery's visibility ends
        self._visibility_timers: dict[tuple[str, str], tuple[int, asyncio.TimerHandle]] = {}
        self._moving: set[tuple[str, int, int]] = set()
        self._isr_changing: set[tuple[str, int, int]] = set()
        self._leader_since = 0.0
        self._stopping = False
        self._rng = random.Random()
        self._group_flusher: GroupFlusher | None = None
        self._peer_ok: dict[str, float] = {}  # loop time of each peer's last good reply
        self._started_at = 0.0
        # This node's storage was lost (service/raft/rejoin.py): its partition replicas
        # are empty, whatever the metadata says. Until it has left every ISR it is in
        # (ControlMixin.hand_over_after_loss), it leads no partition.
        self.storage_lost = False

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _replica(self, queue: str, partition: int) -> PartitionReplica:
        key = (queue, partition)
        replica = self.replicas.get(key)
        if replica is not None:
            return replica
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(queue, partition))
            self._loading[key] = loading
        try:
            return await asyncio.shield(loading)
        finally:
            self._loading.pop(key, None)

    async def _load(self, queue: str, partition: int) -> PartitionReplica:
        state, position = await self.store.load(queue, partition)
        replica = PartitionReplica(
            self.node_id, queue, partition, state, position, self.store, self._flusher(),
            self.leading_replicas,
        )
        replica.on_ops = self._ops_ready
        self.replicas[(queue, partition)] = replica
        return replica

    def _flusher(self) -> GroupFlusher:
        if self._group_flusher is None or self._group_flusher.store is not self.store:
            self._group_flusher = GroupFlusher(self.store)
        return self._group_flusher

    def _ops_ready(self, replica: PartitionReplica) -> None:
        meta = self.meta.get(replica.queue)
        if meta is None:
            return
        for peer in meta.partitions[replica.partition].replicas:
            event = self._wake.get(peer)
            if event is not None:
                event.set()

    def _leading(self, queue: str, partition: int) -> PartitionReplica:
        replica = self.replicas.get((queue, partition))
        meta = self.meta.get(queue)
        if (
            replica is None
            or meta is None
            or not replica.leading
            or meta.partitions[partition].epoch != replica.leader_epoch
        ):
            raise NotPartitionLeader(f"{queue}/{partition}")
        return replica

    def led_partitions(self, queue: str) -> list[PartitionReplica]:
        meta = self.meta.get(queue)
        if meta is None:
            return []
        out = []
        for index, part in enumerate(meta.partitions):
            replica = self.replicas.get((queue, index))
            if replica is not None and replica.leading and replica.leader_epoch == part.epoch:
                out.append(replica)
        return out

    def voters(self) -> list[str]:
        runner = self.runner
        if runner is None:
            return [self.node_id]
        return sorted(runner.core.status().voters)

    # --- metadata proposals ------------------------------------------------------------

    async def propose_meta(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        runner = self.runner
        if runner is None:
            raise QueueError(503, "unavailable", "node is starting")
        deadline = time.monotonic() + PUBLISH_TIMEOUT_SECONDS
        while True:
            leader = runner.core.leader
            try:
                if leader == self.node_id:
                    result = await runner.propose(Command(op, args), PUBLISH_TIMEOUT_SECONDS)
                    return dict(result)
                if leader is not None:
                    status, reply = await self._rpc(leader, "propose", {"op": op, "args": args})
                    if status == 200 and isinstance(reply, dict):
                        return reply
            except (RaftError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.debug("meta proposal failed", extra={"op": op, "error": repr(exc)})
            if time.monotonic() >= deadline:
                raise QueueError(503, "no_leader", "no Raft leader to commit the change; retry")
            await asyncio.sleep(0.05)

    async def propose_here(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """For the internal RPC: only queue metadata ops, only on the Raft leader."""
        if not op.startswith("queue."):
            raise QueueError(400, "bad_request", f"not a queue op: {op!r}")
        runner = self.runner
        if runner is None or runner.core.role != Role.LEADER:
            raise QueueError(409, "not_leader", "not the Raft leader")
        result = await runner.propose(Command(op, args), PUBLISH_TIMEOUT_SECONDS)
        return dict(result)

    # --- internal RPC ------------------------------------------------------------------

    async def _rpc(self, node: str, name: str, body: dict[str, Any],
                   timeout: float = RPC_TIMEOUT_SECONDS) -> tuple[int, Any]:
        url = self.peer_urls.get(node)
        if url is None or self.calls is None:
            raise aiohttp.ClientError(f"no address for {node}")
        # Batched with every other call to that node in this loop turn. Publishes wait on
        # replication and on ISR changes (proposals): those get lanes of their own, so
        # waiting publishes can never hold them up.
        lane = _LANES.get(name, "default")
        try:
            return await asyncio.wait_for(
                self.calls.call(url, f"queue.{name}", body, lane=lane), timeout
            )
        except ForwardError as exc:
            raise aiohttp.ClientConnectionError(str(exc)) from exc
