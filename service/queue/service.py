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
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from service.clock import now_ms
from service.placement import assign, partition_for
from service.queue.base import (
    LONG_POLL_SLICE_SECONDS,
    PUBLISH_TIMEOUT_SECONDS,
    REMOTE_CONSUME_SECONDS,
    REMOTE_EMPTY_SECONDS,
    WATCH_MIN_INTERVAL_SECONDS,
    WATCH_RETRY_SECONDS,
    WATCH_SECONDS,
    Delivered,
    QueueError,
    log,
    make_receipt,
    parse_receipt,
)
from service.queue.control import ControlMixin
from service.queue.meta import QueueMeta, QueueOptions
from service.queue.ops import Ack, Dead, Nack
from service.queue.partition import PublishResult
from service.queue.replica import NotPartitionLeader, PartitionReplica
from service.queue.replication import ReplicationMixin
from service.raft.core import Role
from service.raft.runner import RaftRunner
from service.statemachine import Command, StateMachine

ProposeMeta = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class QueueService(ReplicationMixin, ControlMixin):
    """See the module docstring; the parts live in base, replication and control."""

    # --- wiring ------------------------------------------------------------------------

    def state_machines(self) -> list[StateMachine]:
        return [self.meta]

    def attach(self, runner: RaftRunner) -> None:
        self.runner = runner
        runner.add_apply_listener(self._on_apply)
        runner.add_role_listener(self._on_role)
        self._started_at = asyncio.get_running_loop().time()
        for peer in self.peer_urls:
            self._wake[peer] = asyncio.Event()
            self._spawn(self._sender(peer))
        self._spawn(self._reconciler())
        self._spawn(self._maintenance())
        if self.storage_lost:
            self._spawn(self.hand_over_after_loss())
        self._reconcile_needed.set()

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for _, timer in self._visibility_timers.values():
            timer.cancel()
        self._visibility_timers.clear()
        for replica in self.replicas.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(replica.flush(), 2.0)
            replica.step_down()

    def _on_apply(self, index: int, command: Command, result: Any) -> None:
        if command.op.startswith("queue."):
            self._reconcile_needed.set()
        if command.op == "queue.move" and self.calls is not None:
            # The partition's old leader is suspect: a publish forwarded to it just
            # before it was cut off would wait out its timeout (CallBatcher.probe).
            # The move does not name the old leader; a live peer answers the ping.
            new_leader = command.args.get("leader")
            for peer, url in self.peer_urls.items():
                if peer != new_leader:
                    self.calls.probe(url)

    def _on_role(self, role: Role, term: int, leader: str | None) -> None:
        if role == Role.LEADER:
            self._leader_since = asyncio.get_running_loop().time()

    # --- roles -------------------------------------------------------------------------

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
                if part.leader == self.node_id and self.storage_lost:
                    if replica.leading:
                        replica.step_down()
                elif part.leader == self.node_id:
                    if replica.leader_epoch != part.epoch:
                        if replica.leading:
                            replica.step_down()
                        replica.become_leader(
                            part.epoch, part.isr, now_ms(), self._rng.getrandbits(32)
                        )
                        self._messages_arrived(replica)
                    else:
                        replica.set_isr(part.isr)
                elif replica.leading:
                    replica.step_down()
        for event in self._wake.values():
            event.set()
        # A partition may have a new leader: the consumers waiting here need a watch
        # there now, not when their wait next ends.
        for queue, group in self._message_waiters.lines():
            waited_on = self.meta.get(queue)
            if waited_on is not None:
                self._watch_leaders(waited_on, group)

    # --- queues ------------------------------------------------------------------------

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
            self._messages_arrived(replica)
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
        keyless_partition: int | None = None
        for position, (message_id, key, body) in enumerate(messages):
            mid = message_id if message_id is not None else uuid.uuid4().hex
            if key is not None:
                partition = self.next_partition(meta, key)
            else:
                # The keyless messages of one request go to one partition together (as
                # Kafka's sticky partitioner does): spread message by message, a batch
                # of 10 became about 8 partition writes on every replica and a call to
                # every node, and its answer waited for the slowest. The first one's id
                # (else round-robin) picks it, so a re-sent batch meets its first copy
                # in the same partition's dedup window.
                if keyless_partition is None:
                    keyless_partition = self.next_partition(meta, message_id)
                partition = keyless_partition
            routed.setdefault(partition, []).append((position, (mid, key, body)))
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
            replica.apply_local(ops, lazy=True)
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
        """Deliveries from this node's partitions first (no extra hop), then other
        nodes'. A long poll then waits for an event that may bring messages (see
        LONG_POLL_SLICE_SECONDS) and looks again, here and at other nodes."""
        meta = await self.ensure_queue(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000

        def local() -> list[Delivered]:
            return self.consume_local(queue, group, consumer, max_messages, visibility_ms)

        async def anywhere() -> list[Delivered]:
            return local() or await self._consume_remote(
                self.meta.get(queue) or meta, group, consumer, max_messages, visibility_ms
            )

        out = await anywhere()
        while not out:
            now = loop.time()
            if now >= deadline:
                return []
            self._watch_leaders(self.meta.get(queue) or meta, group)
            self._arm_visibility(queue, group)
            await self._message_waiters.wait(
                queue, group, min(deadline - now, LONG_POLL_SLICE_SECONDS)
            )
            out = await anywhere()
            if len(out) >= max_messages:
                self._message_waiters.pass_on(queue, group)  # there may be more
        return out

    # --- waking long polls -------------------------------------------------------------

    def _arm_visibility(self, queue: str, group: str) -> None:
        """Wake the queue's long polls when the next delivery to `group` led here
        becomes visible again (its visibility or a nack's delay ends)."""
        now = now_ms()
        times = [
            t for replica in self.led_partitions(queue)
            if (t := replica.state.next_visible_after(group, now)) is not None
        ]
        if not times:
            return
        at = min(times)
        key = (queue, group)
        armed = self._visibility_timers.get(key)
        if armed is not None:
            if now < armed[0] <= at:
                return  # an earlier wake-up is due; the one it wakes arms the next
            armed[1].cancel()
        timer = asyncio.get_running_loop().call_later(
            (at - now) / 1000 + 0.001, self._visibility_ended, key
        )
        self._visibility_timers[key] = (at, timer)

    def _visibility_ended(self, key: tuple[str, str]) -> None:
        self._visibility_timers.pop(key, None)
        self._message_waiters.notify(key[0])

    async def watch(self, queue: str, group: str, timeout: float) -> bool:
        """For another node whose consumers of `group` wait: True as soon as partitions
        led here may have messages for them (at once if they have now), False after
        `timeout`."""
        now = now_ms()
        meta = self.meta.get(queue)
        if meta is not None and any(
            replica.state.may_deliver(group, now, meta.options.delivery_limit)
            for replica in self.led_partitions(queue)
        ):
            return True
        self._arm_visibility(queue, group)
        return await self._message_waiters.watch(queue, timeout)

    def _watch_leaders(self, meta: QueueMeta, group: str) -> None:
        """Have a watch open at every other node leading a partition of the queue."""
        for leader in meta.leaders() - {self.node_id}:
            key = (meta.name, group, leader)
            if leader is not None and key not in self._watching and not self._stopping:
                self._watching.add(key)
                self._spawn(self._watch(key))

    async def _watch(self, key: tuple[str, str, str]) -> None:
        """One node's watch at `leader` for its consumers of `group`: while any of them
        waits, each answer that says messages may be there wakes one (it asks that
        leader at once), and a new watch is opened."""
        queue, group, leader = key
        loop = asyncio.get_running_loop()
        body = {"queue": queue, "group": group, "timeout_ms": int(WATCH_SECONDS * 1000)}
        try:
            while not self._stopping and self._message_waiters.waiting(queue, group):
                meta = self.meta.get(queue)
                if meta is None or leader not in meta.leaders():
                    return  # it leads none of them now; a waiting consumer re-arms
                started = loop.time()
                try:
                    status, ready = await self._rpc(leader, "watch", body,
                                                    timeout=WATCH_SECONDS + 2)
                except (aiohttp.ClientError, TimeoutError, OSError):
                    status, ready = 0, False
                if status != 200:
                    await asyncio.sleep(WATCH_RETRY_SECONDS)
                    continue
                if ready is True:
                    self._remote_empty_until.pop(key, None)
                    self._message_waiters.pass_on(queue, group)
                await asyncio.sleep(max(0.0, started + WATCH_MIN_INTERVAL_SECONDS - loop.time()))
        finally:
            self._watching.discard(key)

    async def _consume_remote(
        self, meta: QueueMeta, group: str, consumer: str, max_messages: int,
        visibility_ms: int,
    ) -> list[Delivered]:
        loop = asyncio.get_running_loop()
        leaders = sorted(meta.leaders() - {self.node_id})
        self._rng.shuffle(leaders)
        out: list[Delivered] = []
        for leader in leaders:
            if len(out) >= max_messages:
                break
            empty_key = (meta.name, group, leader)
            if loop.time() < self._remote_empty_until.get(empty_key, 0.0):
                continue
            body = {"queue": meta.name, "group": group, "consumer": consumer,
                    "max": max_messages - len(out), "visibility_ms": visibility_ms}
            try:
                status, reply = await self._rpc(leader, "consume", body,
                                                timeout=REMOTE_CONSUME_SECONDS)
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue  # a dead leader's partitions move; its deliveries time out
            if status == 200 and isinstance(reply, list):
                out.extend(Delivered.from_wire(raw) for raw in reply)
                if reply:
                    self._remote_empty_until.pop(empty_key, None)
                else:
                    self._note_remote_empty(empty_key, loop.time())
        return out

    def hand_back(self, queue: str, group: str, delivered: list[Delivered]) -> None:
        """Deliveries nobody received (their long poll's client hung up): nack them
        without delay so they go to another consumer now, not when their visibility
        ends."""
        if not delivered:
            return
        receipts = [parse_receipt(d.receipt) for d in delivered]

        async def nack() -> None:
            try:
                statuses = await self.settle(queue, group, receipts, 0)
            except QueueError as exc:
                log.info("could not hand back deliveries", extra={"error": exc.message})
                return
            log.info("handed back deliveries nobody received",
                     extra={"queue": queue, "group": group, "count": statuses.count("nacked")})

        self._spawn(nack())

    def _messages_arrived(self, replica: PartitionReplica) -> None:
        """New messages (or messages back from a nack) in a partition led here."""
        self._message_waiters.notify(replica.queue)

    def _note_remote_empty(self, key: tuple[str, str, str], now: float) -> None:
        marks = self._remote_empty_until
        if len(marks) >= 4096:  # groups come and go: keep only the marks still in force
            self._remote_empty_until = marks = {k: t for k, t in marks.items() if t > now}
        marks[key] = now + REMOTE_EMPTY_SECONDS

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
            frees_key = False  # an ack of a keyed message lets the key's next one go
            for pos, offset, count in entries:
                pending = g.pending.get(offset) if g is not None else None
                if pending is None:
                    continue
                if pending.count != count:
                    continue  # a receipt of an earlier delivery: someone else has it now
                if delay_ms is None:
                    ops.append(Ack(group, offset))
                    statuses[pos] = "acked"
                    message = replica.state.messages.get(offset)
                    frees_key = frees_key or (message is not None and message.key is not None)
                else:
                    ops.append(Nack(group, offset, now + delay_ms))
                    statuses[pos] = "nacked"
            if ops:
                replica.apply_local(ops, lazy=True)
                if delay_ms is not None or frees_key:
                    # (After a nack, a consumer woken now finds the message still
                    # delayed, and arms the timer for when the delay ends as it waits.)
                    self._messages_arrived(replica)
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
        leaders = sorted(meta.leaders())
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

