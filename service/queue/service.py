"""The queue service: partitions on Redis Streams, led and replicated across nodes.

Control plane (Raft): queues, their options and each partition's replica set, leader,
in-sync replicas (ISR) and epoch live in the `QueueMetaMachine`. The Raft leader moves
the leadership of partitions whose leader stopped answering to a live ISR member (new
epoch), and back to the preferred replica once it has caught up. Partition leaders shrink
the ISR when a follower lags and grow it when one has caught up.

Data plane (no Raft): the partition leader applies ops (publish, deliver, ack, ...) to its
`PartitionState`, persists them with group commit, and pushes them to every replica in
one request per follower per round. A publish is acknowledged once every ISR member has
it durably. Followers refuse ops from an older epoch, so a deposed leader can no longer
get anything acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack

from service.clock import now_ms
from service.metrics import NodeMetrics
from service.placement import assign, partition_for
from service.queue.meta import PartitionMeta, QueueMeta, QueueMetaMachine, QueueOptions
from service.queue.ops import Ack, Dead, Nack, decode_op
from service.queue.partition import PartitionState, PublishResult
from service.queue.replica import GroupFlusher, NotPartitionLeader, PartitionReplica
from service.queue.store import PartitionStore, Position
from service.raft.core import RaftError, Role
from service.raft.runner import RaftRunner
from service.statemachine import Command, StateMachine
from service.transport.http import FROM_HEADER, SECRET_HEADER

log = logging.getLogger("dsync.queue")

INTERNAL = "/internal/v1/queue"
MSGPACK = "application/msgpack"
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
LONG_POLL_SLICE_SECONDS = 0.1
REMOTE_POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 0.2
# A follower node that answered no replication call for this long leaves the ISR.
PEER_DOWN_SECONDS = 0.7


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


ProposeMeta = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class QueueService:
    def __init__(self, node_id: str, metrics: NodeMetrics, store: PartitionStore) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.store = store
        self.meta = QueueMetaMachine()
        self.runner: RaftRunner | None = None
        self.peer_urls: dict[str, str] = {}
        self.secret: str | None = None
        self.replicas: dict[tuple[str, int], PartitionReplica] = {}
        self._loading: dict[tuple[str, int], asyncio.Future[PartitionReplica]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._reconcile_needed = asyncio.Event()
        self._counters: dict[str, int] = {}
        self._rotation = itertools.count()
        self._moving: set[tuple[str, int, int]] = set()
        self._isr_changing: set[tuple[str, int, int]] = set()
        self._leader_since = 0.0
        self._stopping = False
        self._rng = random.Random()
        self._group_flusher: GroupFlusher | None = None
        self._peer_ok: dict[str, float] = {}  # loop time of each peer's last good reply
        self._started_at = 0.0

    # --- wiring ------------------------------------------------------------------------

    def state_machines(self) -> list[StateMachine]:
        return [self.meta]

    def attach(self, runner: RaftRunner) -> None:
        self.runner = runner
        runner.add_apply_listener(self._on_apply)
        runner.add_role_listener(self._on_role)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=64),
            timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT_SECONDS),
        )
        self._started_at = asyncio.get_running_loop().time()
        for peer in self.peer_urls:
            self._wake[peer] = asyncio.Event()
            self._spawn(self._sender(peer))
        self._spawn(self._reconciler())
        self._spawn(self._maintenance())
        self._reconcile_needed.set()

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for replica in self.replicas.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(replica.flush(), 2.0)
            replica.step_down()
        if self._session is not None:
            await self._session.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_apply(self, index: int, command: Command, result: Any) -> None:
        if command.op.startswith("queue."):
            self._reconcile_needed.set()

    def _on_role(self, role: Role, term: int, leader: str | None) -> None:
        if role == Role.LEADER:
            self._leader_since = asyncio.get_running_loop().time()

    # --- roles -------------------------------------------------------------------------

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
            self.node_id, queue, partition, state, position, self.store, self._flusher()
        )
        replica.on_ops = self._ops_ready
        self.replicas[(queue, partition)] = replica
        return replica

    def _flusher(self) -> GroupFlusher:
        if self._group_flusher is None or self._group_flusher.store is not self.store:
            self._group_flusher = GroupFlusher(self.store)
        return self._group_flusher

    async def _reconciler(self) -> None:
        while not self._stopping:
            await self._reconcile_needed.wait()
            self._reconcile_needed.clear()
            try:
                await self._reconcile()
            except Exception:
                log.exception("queue role reconciliation failed")
                await asyncio.sleep(0.1)
                self._reconcile_needed.set()

    async def _reconcile(self) -> None:
        """Make local replica roles match the committed metadata."""
        for meta in self.meta.queues():
            for index, part in enumerate(meta.partitions):
                if self.node_id not in part.replicas:
                    existing = self.replicas.get((meta.name, index))
                    if existing is not None and existing.leading:
                        existing.step_down()
                    continue
                replica = await self._replica(meta.name, index)
                if part.leader == self.node_id:
                    if replica.leader_epoch != part.epoch:
                        if replica.leading:
                            replica.step_down()
                        replica.become_leader(
                            part.epoch, part.isr, now_ms(), self._rng.getrandbits(32)
                        )
                        replica.new_messages.set()
                    else:
                        replica.set_isr(part.isr)
                elif replica.leading:
                    replica.step_down()
        for event in self._wake.values():
            event.set()

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

    # --- queues ------------------------------------------------------------------------

    def voters(self) -> list[str]:
        runner = self.runner
        if runner is None:
            return [self.node_id]
        return sorted(runner.core.status().voters)

    def default_options(self) -> QueueOptions:
        return QueueOptions(replicas=min(3, len(self.voters())))

    async def create_queue(
        self, queue: str, options: QueueOptions, *, if_absent: bool
    ) -> dict[str, Any]:
        voters = self.voters()
        if options.replicas > len(voters):
            raise QueueError(
                400, "bad_request",
                f"replicas={options.replicas} exceeds the cluster size ({len(voters)})",
            )
        placement = assign(queue, options.partitions, voters, options.replicas)
        args: dict[str, Any] = {
            "queue": queue, **options.to_dict(),
            "placement": [list(p) for p in placement], "if_absent": if_absent,
        }
        result = await self.propose_meta("queue.create", args)
        if result.get("status") == "error":
            status = 409 if result.get("code") == "queue_exists" else 400
            raise QueueError(status, str(result.get("code")), str(result.get("message")))
        await self._wait_meta(lambda: self.meta.get(queue) is not None)
        return result

    async def ensure_queue(self, queue: str) -> QueueMeta:
        meta = self.meta.get(queue)
        if meta is None:
            await self.create_queue(queue, self.default_options(), if_absent=True)
            meta = self.meta.get(queue)
            if meta is None:
                raise QueueError(503, "unavailable", "the queue is being created; retry")
        return meta

    async def _wait_meta(self, ready: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise QueueError(503, "unavailable", "metadata did not arrive in time; retry")
            await asyncio.sleep(0.01)

    # --- publish -----------------------------------------------------------------------

    def next_partition(self, meta: QueueMeta, key: str | None) -> int:
        counter = self._counters.get(meta.name, self._rng.randrange(1 << 16))
        self._counters[meta.name] = counter + 1
        return partition_for(key, meta.options.partitions, counter=counter)

    async def publish_local(
        self, queue: str, partition: int, items: list[tuple[str, str | None, str]]
    ) -> list[PublishResult]:
        replica = self._leading(queue, partition)
        meta = self.meta.get(queue)
        assert meta is not None
        cap = math.ceil(meta.options.max_length / meta.options.partitions)
        new = len({i for i, _, _ in items if i not in replica.state.ids})
        if new and len(replica.state) + new > cap:
            raise QueueError(
                429, "queue_full",
                f"queue {queue!r} is at its maximum length ({meta.options.max_length}; "
                f"{cap} per partition); consume and ack, then retry",
            )
        started = time.perf_counter()
        ops, results = replica.state.plan_publish(items)
        seq = replica.apply_local(ops) if ops else replica.position.seq
        if ops:
            replica.new_messages.set()
        try:
            await replica.wait_committed(seq, PUBLISH_TIMEOUT_SECONDS)
        except TimeoutError as exc:
            raise QueueError(
                503, "unavailable",
                "the publish was not confirmed by the in-sync replicas in time; the outcome "
                "is unknown: retry with the same message ids (they deduplicate)",
            ) from exc
        self.metrics.queue_published.labels(self.node_id, queue).inc(len(ops))
        self.metrics.queue_publish_seconds.labels(self.node_id).observe(
            time.perf_counter() - started
        )
        return results

    async def publish(
        self, queue: str, messages: list[tuple[str | None, str | None, str]]
    ) -> list[tuple[int, PublishResult]]:
        """(id, key, body) per message -> (partition, result) each; ids are assigned here
        when absent, before the first attempt, so a retry after a lost answer
        deduplicates."""
        meta = await self.ensure_queue(queue)
        routed: dict[int, list[tuple[int, tuple[str, str | None, str]]]] = {}
        for position, (message_id, key, body) in enumerate(messages):
            mid = message_id if message_id is not None else uuid.uuid4().hex
            # A keyless message with a client id goes where its id hashes, so a re-sent
            # copy meets the first in the same partition's dedup window.
            placed_by = key if key is not None else message_id
            routed.setdefault(self.next_partition(meta, placed_by), []).append(
                (position, (mid, key, body))
            )
        work = {p: [item for _, item in batch] for p, batch in routed.items()}

        async def local(partition: int, items: Any) -> Any:
            results = await self.publish_local(queue, partition, items)
            return [[r.offset, r.id, r.duplicate] for r in results]

        done = await self.route(queue, work, local, "publish", {"queue": queue})
        out: list[tuple[int, PublishResult] | None] = [None] * len(messages)
        for partition, batch in routed.items():
            for (pos, _), raw in zip(batch, done[partition], strict=True):
                out[pos] = (partition, PublishResult(int(raw[0]), str(raw[1]), bool(raw[2])))
        return [item for item in out if item is not None]

    async def route(
        self,
        queue: str,
        work: dict[int, Any],
        local: Callable[[int, Any], Awaitable[Any]],
        rpc: str,
        extra: dict[str, Any],
    ) -> dict[int, Any]:
        """Run work[p] on the leader of each partition p: here through `local`, elsewhere
        in one `rpc` per leader node carrying all its partitions. While leadership moves
        (a leader died, or was just replaced) the rest is retried until a deadline."""
        results: dict[int, Any] = {}
        deadline = time.monotonic() + PUBLISH_TIMEOUT_SECONDS
        last = "no leader"
        while True:
            meta = self.meta.get(queue)
            if meta is None:
                raise QueueError(404, "not_found", f"no queue {queue!r}")
            groups: dict[str, list[int]] = {}
            for partition in sorted(work):
                if partition not in results:
                    groups.setdefault(meta.partitions[partition].leader, []).append(partition)

            async def run_local(partition: int) -> None:
                nonlocal last
                try:
                    results[partition] = await local(partition, work[partition])
                except NotPartitionLeader:
                    last = f"leadership of {queue}/{partition} is moving"

            async def run_remote(leader: str, parts: list[int]) -> None:
                nonlocal last
                body = {**extra, "parts": [[p, work[p]] for p in parts]}
                try:
                    status, reply = await self._rpc(leader, rpc, body)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    last = f"{leader} unreachable: {exc!r}"
                    return
                if status != 200 or not isinstance(reply, list):
                    error = reply.get("error", {}) if isinstance(reply, dict) else {}
                    raise QueueError(status, str(error.get("code", "unavailable")),
                                     str(error.get("message", f"{leader} answered {status}")))
                for partition, answer in zip(parts, reply, strict=False):
                    if answer.get("ok"):
                        results[partition] = answer["result"]
                    elif answer.get("code") == "not_leader":
                        last = f"{leader} does not lead {queue}/{partition}"
                    else:
                        raise QueueError(int(answer.get("status", 503)),
                                         str(answer.get("code")), str(answer.get("message")))

            jobs: list[Awaitable[None]] = []
            for leader, parts in groups.items():
                if leader == self.node_id:
                    jobs.extend(run_local(p) for p in parts)
                else:
                    jobs.append(run_remote(leader, parts))
            await asyncio.gather(*jobs)
            if len(results) == len(work):
                return results
            if time.monotonic() >= deadline:
                raise QueueError(503, "unavailable", f"{last}; retry shortly")
            await asyncio.sleep(0.05)

    async def serve_parts(
        self, parts: list[Any], local: Callable[[int, Any], Awaitable[Any]]
    ) -> list[dict[str, Any]]:
        """The other side of `route`: one answer per partition, in order."""

        async def one(partition: int, payload: Any) -> dict[str, Any]:
            try:
                return {"ok": True, "result": await local(partition, payload)}
            except NotPartitionLeader as exc:
                return {"ok": False, "status": 409, "code": "not_leader", "message": str(exc)}
            except QueueError as exc:
                return {"ok": False, "status": exc.status, "code": exc.code,
                        "message": exc.message}

        return list(await asyncio.gather(*(one(int(p), payload) for p, payload in parts)))

    # --- consume -----------------------------------------------------------------------

    def consume_local(
        self, queue: str, group: str, consumer: str, max_messages: int, visibility_ms: int
    ) -> list[Delivered]:
        meta = self.meta.get(queue)
        led = self.led_partitions(queue)
        if meta is None or not led:
            return []
        start = next(self._rotation) % len(led)
        now = now_ms()
        out: list[Delivered] = []
        for replica in led[start:] + led[:start]:
            if len(out) >= max_messages:
                break
            ops = replica.state.plan_deliver(
                group, consumer, max_messages - len(out), visibility_ms, now,
                meta.options.delivery_limit,
            )
            if not ops:
                continue
            replica.apply_local(ops)
            for op in ops:
                if isinstance(op, Dead):
                    self.metrics.queue_dead_lettered.labels(self.node_id, queue).inc()
                    continue
                message = replica.state.messages[op.offset]
                out.append(Delivered(
                    message.id, make_receipt(replica.partition, op.offset, op.count),
                    replica.partition, message.key, message.body, op.count,
                ))
                if op.count > 1:
                    self.metrics.queue_redelivered.labels(self.node_id, queue).inc()
        if out:
            self.metrics.queue_delivered.labels(self.node_id, queue).inc(len(out))
        return out

    async def consume(
        self, queue: str, group: str, consumer: str, max_messages: int, visibility_ms: int,
        wait_ms: int,
    ) -> list[Delivered]:
        """Deliveries from this node's partitions first (no extra hop); other nodes'
        partitions when ours have nothing: at once, then while long-polling once every
        REMOTE_POLL_SECONDS, and once more before giving up, so idle consumers do not
        flood the other nodes with empty polls."""
        meta = await self.ensure_queue(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000

        def local() -> list[Delivered]:
            return self.consume_local(queue, group, consumer, max_messages, visibility_ms)

        async def remote() -> list[Delivered]:
            return await self._consume_remote(meta, group, consumer, max_messages,
                                              visibility_ms)

        out = local() or await remote()
        next_remote = loop.time() + REMOTE_POLL_SECONDS
        while not out:
            now = loop.time()
            if now >= deadline:
                return []
            await self._wait_for_messages(
                queue, min(deadline - now, LONG_POLL_SLICE_SECONDS, max(0.0, next_remote - now))
            )
            out = local()
            now = loop.time()
            if not out and (now >= next_remote or now >= deadline):
                out = await remote()
                next_remote = now + REMOTE_POLL_SECONDS
        return out

    async def _consume_remote(
        self, meta: QueueMeta, group: str, consumer: str, max_messages: int,
        visibility_ms: int,
    ) -> list[Delivered]:
        leaders = sorted({p.leader for p in meta.partitions} - {self.node_id})
        self._rng.shuffle(leaders)
        out: list[Delivered] = []
        for leader in leaders:
            if len(out) >= max_messages:
                break
            body = {"queue": meta.name, "group": group, "consumer": consumer,
                    "max": max_messages - len(out), "visibility_ms": visibility_ms}
            try:
                status, reply = await self._rpc(leader, "consume", body, timeout=1.0)
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue  # a dead leader's partitions move; its deliveries time out
            if status == 200 and isinstance(reply, list):
                out.extend(Delivered.from_wire(raw) for raw in reply)
        return out

    async def _wait_for_messages(self, queue: str, timeout: float) -> None:
        led = self.led_partitions(queue)
        events = [r.new_messages for r in led]
        for event in events:
            event.clear()
        if not events:
            await asyncio.sleep(timeout)
            return
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    # --- ack / nack --------------------------------------------------------------------

    def settle_local(
        self, queue: str, group: str, items: list[tuple[int, int, int]], delay_ms: int | None
    ) -> list[str]:
        """Ack (delay None) or nack receipts of partitions led here; one status each:
        acked / nacked / not_pending (already acked, dead, or redelivered since)."""
        by_partition: dict[int, list[tuple[int, int, int]]] = {}
        for pos, (partition, offset, count) in enumerate(items):
            by_partition.setdefault(partition, []).append((pos, offset, count))
        statuses = ["not_pending"] * len(items)
        now = now_ms()
        for partition, entries in by_partition.items():
            replica = self._leading(queue, partition)
            g = replica.state.groups.get(group)
            ops: list[Ack | Nack] = []
            for pos, offset, count in entries:
                pending = g.pending.get(offset) if g is not None else None
                if pending is None:
                    continue
                if pending.count != count:
                    continue  # a receipt of an earlier delivery: someone else has it now
                if delay_ms is None:
                    ops.append(Ack(group, offset))
                    statuses[pos] = "acked"
                else:
                    ops.append(Nack(group, offset, now + delay_ms))
                    statuses[pos] = "nacked"
            if ops:
                replica.apply_local(ops)
                if delay_ms is not None:
                    replica.new_messages.set()
        acked = statuses.count("acked")
        if acked:
            self.metrics.queue_acked.labels(self.node_id, queue).inc(acked)
        return statuses

    async def settle(
        self, queue: str, group: str, receipts: list[tuple[int, int, int]], delay_ms: int | None
    ) -> list[str]:
        meta = self.meta.get(queue)
        if meta is None:
            raise QueueError(404, "not_found", f"no queue {queue!r}")
        for partition, _, _ in receipts:
            if partition >= meta.options.partitions:
                raise QueueError(400, "bad_receipt",
                                 f"receipt names partition {partition}; the queue has "
                                 f"{meta.options.partitions}")
        by_partition: dict[int, list[int]] = {}
        for pos, (partition, _, _) in enumerate(receipts):
            by_partition.setdefault(partition, []).append(pos)
        work = {p: [list(receipts[i]) for i in ps] for p, ps in by_partition.items()}

        async def local(partition: int, items: Any) -> Any:
            return self.settle_local(queue, group, [tuple(i) for i in items], delay_ms)

        done = await self.route(queue, work, local, "settle",
                                {"queue": queue, "group": group, "delay_ms": delay_ms})
        statuses = ["not_pending"] * len(receipts)
        for partition, positions in by_partition.items():
            for pos, status in zip(positions, done[partition], strict=True):
                statuses[pos] = str(status)
        return statuses

    # --- inspection --------------------------------------------------------------------

    def stats_local(self, queue: str) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for replica in self.led_partitions(queue):
            state = replica.state
            out[replica.partition] = {
                "length": len(state),
                "pending": state.pending_count(),
                "lag": {g: state.lag(g) for g in sorted(state.groups)},
                "end_offset": state.end,
                "trimmed_offset": state.trimmed,
                "dead_letters": len(state.dead),
                "followers": dict(sorted(replica.follower_acked.items())),
                "seq": replica.position.seq,
            }
        return out

    def dead_local(self, queue: str, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for replica in self.led_partitions(queue):
            for letter in replica.state.dead[-limit:]:
                m = letter.message
                out.append({"id": m.id, "partition": replica.partition, "key": m.key,
                            "body": m.body, "group": letter.group,
                            "delivery_count": letter.count})
        return out

    def peek_local(self, queue: str, limit: int) -> list[str]:
        out: list[str] = []
        for replica in self.led_partitions(queue):
            for message in itertools.islice(replica.state.messages.values(), limit):
                out.append(message.body)
        return out[:limit]

    async def gather(self, queue: str, rpc: str, body: dict[str, Any],
                     local: Callable[[], Any]) -> list[Any]:
        """Ask every partition leader of the queue (here and remote) for `rpc`."""
        meta = self.meta.get(queue)
        if meta is None:
            raise QueueError(404, "not_found", f"no queue {queue!r}")
        leaders = sorted({p.leader for p in meta.partitions})
        results: list[Any] = []
        for leader in leaders:
            if leader == self.node_id:
                results.append(local())
                continue
            try:
                status, reply = await self._rpc(leader, rpc, body, timeout=1.0)
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            if status == 200:
                results.append(reply)
        return results

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

    # --- replication: leader side ------------------------------------------------------

    async def _sender(self, peer: str) -> None:
        """Pushes ops to one follower node, one request in flight at a time (later ops
        ride in the next request). With nothing to send it still calls every
        HEARTBEAT_SECONDS: partition leaders learn which followers are reachable, and
        drop an unreachable one from the ISR before a publish has to wait for it."""
        wake = self._wake[peer]
        backoff = 0.05
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), HEARTBEAT_SECONDS)
            wake.clear()
            while not self._stopping:
                items, more = self._replication_items(peer)
                try:
                    status, reply = await self._rpc(
                        peer, "replicate", {"items": items}, timeout=REPLICATE_TIMEOUT_SECONDS
                    )
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    log.debug("replicate to %s failed: %r", peer, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(HEARTBEAT_SECONDS * 2, backoff * 2)
                    break
                backoff = 0.05
                if status != 200 or not isinstance(reply, list):
                    await asyncio.sleep(0.05)
                    break
                self._peer_ok[peer] = asyncio.get_running_loop().time()
                self._replication_replies(peer, items, reply)
                if not more:
                    break

    def _replication_items(self, peer: str) -> tuple[list[dict[str, Any]], bool]:
        items: list[dict[str, Any]] = []
        more = False
        for (queue, partition), replica in sorted(self.replicas.items()):
            if not replica.leading:
                continue
            meta = self.meta.get(queue)
            if meta is None or peer not in meta.partitions[partition].replicas:
                continue
            acked = replica.follower_acked.get(peer)
            # "upto": the leader's end when this was sent; a follower that acks it was
            # caught up at that moment (what ISR membership is judged by).
            base = {"q": queue, "p": partition, "epoch": replica.leader_epoch,
                    "upto": replica.position.seq}
            if acked is None:
                # Probe: where is the follower? (its reply says, or it agrees and is done)
                items.append({**base, "prev": [replica.position.seq, replica.position.stamp],
                              "ops": []})
                continue
            if acked >= replica.position.seq:
                continue
            ops = replica.ops_after(acked, MAX_OPS_PER_ITEM)
            prev_stamp = replica.stamp_at(acked)
            if ops is None or prev_stamp is None:
                items.append({**base, "replace": replica.state.export(),
                              "seq": replica.position.seq, "stamp": replica.position.stamp})
                continue
            if acked + len(ops) < replica.position.seq:
                more = True
            items.append({**base, "prev": [acked, prev_stamp],
                          "ops": [[o.stamp, o.op] for o in ops]})
        return items, more

    def _replication_replies(
        self, peer: str, items: list[dict[str, Any]], replies: list[Any]
    ) -> None:
        for item, reply in zip(items, replies, strict=False):
            replica = self.replicas.get((item["q"], item["p"]))
            if replica is None or not replica.leading or not isinstance(reply, dict):
                continue
            if replica.leader_epoch != item["epoch"]:
                continue
            seq, stamp = int(reply.get("seq", 0)), int(reply.get("stamp", 0))
            if reply.get("ok"):
                replica.follower_ack(peer, seq)
                if seq >= item["upto"]:
                    replica.follower_caught_up_at[peer] = asyncio.get_running_loop().time()
            elif reply.get("error"):
                continue  # stale epoch / unknown queue: metadata will catch up
            elif replica.agrees(seq, stamp):
                replica.follower_ack(peer, seq)
            else:
                # Diverged or too far behind: the next round sends the whole state.
                replica.follower_acked[peer] = -1

    # --- replication: follower side ----------------------------------------------------

    async def handle_replicate(self, sender: str, items: list[Any]) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = []
        touched: list[PartitionReplica] = []
        for item in items:
            reply, replica = await self._accept(sender, item)
            replies.append(reply)
            if replica is not None:
                touched.append(replica)
        await asyncio.gather(*(r.flush() for r in touched))
        for reply in replies:
            key = reply.pop("_key", None)
            if key is not None:
                replica = self.replicas[key]
                reply["seq"], reply["stamp"] = replica.durable_seq, replica.position.stamp
        return replies

    async def _accept(
        self, sender: str, item: Any
    ) -> tuple[dict[str, Any], PartitionReplica | None]:
        try:
            queue, partition, epoch = str(item["q"]), int(item["p"]), int(item["epoch"])
        except (KeyError, TypeError, ValueError):
            return {"ok": False, "error": "bad_item"}, None
        meta = self.meta.get(queue)
        if meta is None or partition >= len(meta.partitions):
            return {"ok": False, "error": "unknown_queue"}, None
        part = meta.partitions[partition]
        if self.node_id not in part.replicas:
            return {"ok": False, "error": "not_replica"}, None
        if epoch < part.epoch:
            return {"ok": False, "error": "stale_epoch"}, None
        replica = await self._replica(queue, partition)
        if replica.leading:
            if epoch <= replica.leader_epoch:
                return {"ok": False, "error": "stale_epoch"}, None
            replica.step_down()
        if epoch < replica.position.epoch:
            return {"ok": False, "error": "stale_epoch"}, None
        if "replace" in item:
            try:
                state = PartitionState.from_export(item["replace"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("bad state transfer", extra={"sender": sender, "error": repr(exc)})
                return {"ok": False, "error": "bad_item"}, None
            await replica.replace_state(
                state, Position(epoch, int(item["seq"]), int(item["stamp"]))
            )
            replica.new_messages.set()
            return {"ok": True, "_key": (queue, partition)}, replica
        try:
            prev_seq, prev_stamp = (int(x) for x in item["prev"])
            ops = [(int(stamp), decode_op(op)) for stamp, op in item["ops"]]
        except (KeyError, TypeError, ValueError) as exc:  # OpDecodeError is a ValueError
            log.warning("bad replicate item", extra={"sender": sender, "error": repr(exc)})
            return {"ok": False, "error": "bad_item"}, None
        if (replica.position.seq, replica.position.stamp) != (prev_seq, prev_stamp):
            return {"ok": False, "seq": replica.position.seq,
                    "stamp": replica.position.stamp}, None
        replica.apply_replicated(epoch, ops)
        return {"ok": True, "_key": (queue, partition)}, replica

    # --- maintenance: ISR, leader moves, trimming, gauges ------------------------------

    async def _maintenance(self) -> None:
        last_trim = 0.0
        while not self._stopping:
            await asyncio.sleep(CONTROL_INTERVAL_SECONDS)
            loop_time = asyncio.get_running_loop().time()
            try:
                self._check_isr(loop_time)
                if self.runner is not None and self.runner.core.role == Role.LEADER:
                    self._control(loop_time)
                if loop_time - last_trim >= TRIM_INTERVAL_SECONDS:
                    last_trim = loop_time
                    self._trim_and_gauge()
            except Exception:
                log.exception("queue maintenance failed")

    def _check_isr(self, now: float) -> None:
        for (queue, partition), replica in list(self.replicas.items()):
            if not replica.leading:
                continue
            meta = self.meta.get(queue)
            if meta is None:
                continue
            part = meta.partitions[partition]
            if part.epoch != replica.leader_epoch:
                continue
            for follower in part.replicas:
                if follower == self.node_id:
                    continue
                reachable = (
                    now - max(self._peer_ok.get(follower, 0.0), self._started_at)
                    < PEER_DOWN_SECONDS
                )
                if reachable and replica.follower_acked.get(follower, -1) >= replica.position.seq:
                    replica.follower_caught_up_at[follower] = now
                caught_up_at = replica.follower_caught_up_at.get(follower, -math.inf)
                if follower in part.isr and (
                    not reachable or now - caught_up_at > ISR_LAG_SECONDS
                ):
                    isr = [n for n in part.isr if n != follower]
                    self._change_isr(queue, partition, part, isr)
                elif (
                    follower not in part.isr
                    and reachable
                    and now - caught_up_at < ISR_LAG_SECONDS / 2
                ):
                    isr = [n for n in part.replicas if n in part.isr or n == follower]
                    self._change_isr(queue, partition, part, isr)

    def _change_isr(self, queue: str, partition: int, part: PartitionMeta,
                    isr: list[str]) -> None:
        key = (queue, partition, part.epoch)
        if key in self._isr_changing:
            return
        self._isr_changing.add(key)

        async def change() -> None:
            try:
                await self.propose_meta("queue.isr", {"queue": queue, "partition": partition,
                                                      "epoch": part.epoch, "isr": isr})
                log.info("isr changed", extra={"queue": queue, "partition": partition,
                                               "isr": isr})
            except QueueError as exc:
                log.info("isr change failed", extra={"error": exc.message})
            finally:
                await asyncio.sleep(0.2)
                self._isr_changing.discard(key)

        self._spawn(change())

    def _live(self, node: str, now: float) -> bool:
        if node == self.node_id or self.runner is None:
            return True
        heard = self.runner.last_heard.get(node, 0.0)
        return now - max(heard, self._leader_since) < DEAD_AFTER_SECONDS

    def _control(self, now: float) -> None:
        """Raft leader: move partitions away from dead leaders, back to preferred ones."""
        led: dict[str, int] = {}
        for meta in self.meta.queues():
            for part in meta.partitions:
                led[part.leader] = led.get(part.leader, 0) + 1
        for meta in self.meta.queues():
            for index, part in enumerate(meta.partitions):
                target: str | None = None
                isr = part.isr
                if not self._live(part.leader, now):
                    live = [n for n in part.isr if n != part.leader and self._live(n, now)]
                    if live:
                        target = min(live, key=lambda n: (led.get(n, 0), part.replicas.index(n)))
                        isr = tuple(n for n in part.isr if n != part.leader)
                else:
                    preferred = part.replicas[0]
                    if (preferred != part.leader and preferred in part.isr
                            and self._live(preferred, now)):
                        target = preferred
                if target is None:
                    continue
                key = (meta.name, index, part.epoch)
                if key in self._moving:
                    continue
                self._moving.add(key)
                led[target] = led.get(target, 0) + 1
                self._spawn(self._move(meta.name, index, part, target, isr, key))

    async def _move(self, queue: str, partition: int, part: PartitionMeta, leader: str,
                    isr: tuple[str, ...], key: tuple[str, int, int]) -> None:
        try:
            await self.runner.propose(  # type: ignore[union-attr]
                Command("queue.move", {"queue": queue, "partition": partition,
                                       "epoch": part.epoch, "leader": leader,
                                       "isr": list(isr)}),
                PUBLISH_TIMEOUT_SECONDS,
            )
        except (RaftError, TimeoutError) as exc:
            log.info("partition move failed", extra={"error": repr(exc)})
        finally:
            await asyncio.sleep(0.5)
            self._moving.discard(key)

    def _trim_and_gauge(self) -> None:
        for (queue, partition), replica in list(self.replicas.items()):
            if not replica.leading:
                continue
            trim = replica.state.plan_trim()
            if trim is not None:
                replica.apply_local([trim])
            lags = [replica.state.lag(g) for g in replica.state.groups] or [len(replica.state)]
            self.metrics.queue_lag.labels(self.node_id, queue, str(partition)).set(max(lags))

    # --- internal RPC ------------------------------------------------------------------

    async def _rpc(self, node: str, name: str, body: dict[str, Any],
                   timeout: float = RPC_TIMEOUT_SECONDS) -> tuple[int, Any]:
        url = self.peer_urls.get(node)
        if url is None or self._session is None:
            raise aiohttp.ClientError(f"no address for {node}")
        headers = {"Content-Type": MSGPACK, FROM_HEADER: self.node_id}
        if self.secret:
            headers[SECRET_HEADER] = self.secret
        data = msgpack.packb(body, use_bin_type=True)
        async with self._session.post(
            f"{url}{INTERNAL}/{name}", data=data, headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            raw = await response.read()
            if response.content_type == MSGPACK:
                return response.status, msgpack.unpackb(raw, raw=False, strict_map_key=False)
            return response.status, {}
