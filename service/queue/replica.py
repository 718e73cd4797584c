"""One partition replica on this node: its state, its position in the op stream, and the
group-commit flusher that makes applied ops durable in the node's Redis.

On the partition leader it also holds the recent ops (for followers to catch up from) and
what each follower has durably acknowledged; publishes wait here until they are durable
on every in-sync replica.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from service.queue.ops import Op, Rebase, encode_op
from service.queue.partition import PartitionState, Writes
from service.queue.store import PartitionStore, Position

log = logging.getLogger("dsync.queue")

# Recent ops a leader keeps for followers; one further behind gets the whole state.
OP_BUFFER = 50_000
FLUSH_RETRY_SECONDS = 0.05
# How long ops nobody waits for (deliveries, acks, nacks, trims) may wait before they are
# saved and shipped: they ride with the next publish's round, or go on their own after
# this. Saving and shipping each one as it came cost a Redis transaction on every
# replica and a replication request per follower for every consume and every ack.
LAZY_OPS_SECONDS = 0.02


class NotPartitionLeader(Exception):
    """This node does not lead the partition (any more)."""


@dataclass(frozen=True, slots=True)
class ShippedOp:
    seq: int
    stamp: int  # the leadership incarnation that made it (see Position.stamp)
    op: list[Any]  # encode_op form


class PartitionReplica:
    def __init__(
        self,
        node_id: str,
        queue: str,
        partition: int,
        state: PartitionState,
        position: Position,
        store: PartitionStore,
        flusher: GroupFlusher | None = None,
        leading: dict[tuple[str, int], PartitionReplica] | None = None,
    ) -> None:
        """`leading`: the node's index of the replicas it leads, kept here (the only
        place leadership changes) so the node's periodic work visits those alone."""
        self.node_id = node_id
        self._leading_index = leading if leading is not None else {}
        self.queue = queue
        self.partition = partition
        self.state = state
        self.position = position
        self.store = store
        self.durable_seq = position.seq
        self.leader_epoch = 0  # epoch this node leads the partition in; 0: not leading
        self.stamp = 0  # this leadership's stamp
        # Where this leadership's history began: (seq, stamp) of the op before its first.
        self.base: tuple[int, int] = (position.seq, position.stamp)
        self.buffer: collections.deque[ShippedOp] = collections.deque(maxlen=OP_BUFFER)
        self.follower_acked: dict[str, int] = {}
        # Loop time each follower was last seen holding everything sent to it.
        self.follower_caught_up_at: dict[str, float] = {}
        self.isr: tuple[str, ...] = ()
        self.progress = asyncio.Event()  # set whenever durable/acked positions move
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.flusher = flusher if flusher is not None else GroupFlusher(store)
        self._unsaved = Writes()
        self.on_ops: Callable[[PartitionReplica], None] | None = None  # wakes senders
        self._lazy_due: asyncio.TimerHandle | None = None

    # --- leadership --------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.leader_epoch > 0

    def become_leader(self, epoch: int, isr: Sequence[str], now: int, nonce: int) -> None:
        """Lead in `epoch`. `nonce` (random, 32 bits) makes this incarnation's stamp
        unique even when a restarted node resumes the same epoch: ops it made before the
        crash but never persisted may sit on followers, and must not pass for new ones."""
        self.leader_epoch = epoch
        self._leading_index[(self.queue, self.partition)] = self
        self.stamp = (epoch << 32) | (nonce & 0xFFFFFFFF)
        self.isr = tuple(isr)
        self.follower_acked = {}
        # Every ISR member starts with a full grace period under the new leader.
        started = asyncio.get_running_loop().time()
        self.follower_caught_up_at = {f: started for f in self.isr}
        self.buffer.clear()
        self.base = (self.position.seq, self.position.stamp)
        self.position = Position(epoch, self.position.seq, self.position.stamp)
        # The first op of every epoch: restarts visibility deadlines on this clock and
        # marks where this leader's history begins.
        self.apply_local([Rebase(now)])
        log.info("partition leader", extra={"queue": self.queue, "partition": self.partition,
                                            "epoch": epoch, "seq": self.position.seq})

    def step_down(self) -> None:
        if self.leader_epoch:
            log.info("partition follower",
                     extra={"queue": self.queue, "partition": self.partition})
        self.leader_epoch = 0
        self._leading_index.pop((self.queue, self.partition), None)
        self.follower_acked = {}
        self.buffer.clear()
        self._cancel_lazy()
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(NotPartitionLeader(f"{self.queue}/{self.partition}"))
                future.exception()
        self._waiters = []

    # --- leader: applying and committing -----------------------------------------------

    def apply_local(self, ops: Iterable[Op], *, lazy: bool = False) -> int:
        """Apply ops as the leader; returns the seq of the last one.

        `lazy`: nobody waits for these ops to be durable and replicated (no answer
        depends on it), so they are saved and shipped with the next ops that are
        waited for, or after LAZY_OPS_SECONDS. Losing them in a crash only redelivers
        messages, which at-least-once delivery allows."""
        if not self.leading:
            raise NotPartitionLeader(f"{self.queue}/{self.partition}")
        seq = self.position.seq
        for op in ops:
            self.state.apply(op)
            seq += 1
            self.buffer.append(ShippedOp(seq, self.stamp, encode_op(op)))
        if seq > self.position.seq:
            self.position = Position(self.leader_epoch, seq, self.stamp)
        if lazy:
            if self._lazy_due is None:
                loop = asyncio.get_running_loop()
                self._lazy_due = loop.call_later(LAZY_OPS_SECONDS, self._ship)
        else:
            self._ship()
        return seq

    def _ship(self) -> None:
        """Save and replicate everything applied so far."""
        self._cancel_lazy()
        self._schedule_flush()
        if self.on_ops is not None:
            self.on_ops(self)

    def _cancel_lazy(self) -> None:
        if self._lazy_due is not None:
            self._lazy_due.cancel()
            self._lazy_due = None

    def committed(self, seq: int) -> bool:
        if self.durable_seq < seq:
            return False
        return all(
            self.follower_acked.get(f, 0) >= seq for f in self.isr if f != self.node_id
        )

    async def wait_committed(self, seq: int, timeout: float) -> None:
        if self.committed(seq):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        await asyncio.wait_for(asyncio.shield(future), timeout)

    def set_isr(self, isr: Sequence[str]) -> None:
        self.isr = tuple(isr)
        self._release_waiters()

    def follower_ack(self, node: str, seq: int) -> None:
        if seq > self.follower_acked.get(node, -1):
            self.follower_acked[node] = seq
            self._release_waiters()

    def release_acked_ops(self, followers: Iterable[str]) -> None:
        """Drop the buffered ops that every follower of the partition holds.

        The buffer is there for followers that are behind; keeping ops all of them hold
        (up to OP_BUFFER per partition) only cost memory and made every full garbage
        collection walk two objects per op. The op at the lowest acknowledged position
        stays: its stamp is how that follower's next request says where it continues. A
        follower that has not answered this leadership yet keeps everything."""
        low = min((self.follower_acked.get(f, -1) for f in followers), default=-1)
        buffer = self.buffer
        while buffer and buffer[0].seq < low:
            buffer.popleft()

    def ops_after(self, seq: int, limit: int) -> list[ShippedOp] | None:
        """Ops after seq from the buffer, or None if they are no longer all there."""
        if seq >= self.position.seq:
            return []
        if not self.buffer or self.buffer[0].seq > seq + 1:
            return None
        start = seq + 1 - self.buffer[0].seq
        return [self.buffer[i] for i in range(start, min(len(self.buffer), start + limit))]

    def stamp_at(self, seq: int) -> int | None:
        """The stamp of op `seq` in this leader's history, if still known."""
        if seq == self.position.seq:
            return self.position.stamp
        if seq == self.base[0]:
            return self.base[1]
        if self.buffer and self.buffer[0].seq <= seq <= self.buffer[-1].seq:
            return self.buffer[seq - self.buffer[0].seq].stamp
        return None

    def agrees(self, seq: int, stamp: int) -> bool:
        """Whether a follower at (seq, stamp) holds a prefix of this history."""
        return seq == 0 or (seq <= self.position.seq and self.stamp_at(seq) == stamp)

    # --- follower: applying what the leader sent ---------------------------------------

    def apply_replicated(self, epoch: int, ops: Sequence[tuple[int, Op]]) -> None:
        """Apply (stamp, op) pairs that follow our position directly (decoded by the
        caller first, so a bad op rejects the whole batch before any of it applies)."""
        seq, stamp = self.position.seq, self.position.stamp
        for op_stamp, op in ops:
            self.state.apply(op)
            seq += 1
            stamp = op_stamp
        self.position = Position(epoch, seq, stamp)
        self._schedule_flush()

    async def replace_state(self, state: PartitionState, position: Position) -> None:
        """Take the leader's whole state (we were too far behind, or diverged)."""
        await self.flush()
        self.state = state
        self.position = position
        self.base = (position.seq, position.stamp)
        self._unsaved = Writes()
        state.take_writes()
        await self.store.replace(self.queue, self.partition, state, position)
        self.durable_seq = position.seq

    # --- durability (group commit, through the node's flusher) ------------------------

    def _schedule_flush(self) -> None:
        self.flusher.request(self)

    async def flush(self) -> None:
        """Return once everything applied so far is durable."""
        target = self.position.seq
        while self.durable_seq < target:
            self.flusher.request(self)
            await self.flusher.wait()

    def take_unsaved(self) -> tuple[Writes, Position]:
        """For the flusher: what to save now, and the position it brings us to."""
        self._unsaved.merge(self.state.take_writes())
        writes, self._unsaved = self._unsaved, Writes()
        return writes, self.position

    def save_failed(self, writes: Writes) -> None:
        # Keep the writes: the next attempt saves them with whatever came since.
        writes.merge(self._unsaved)
        self._unsaved = writes

    def saved(self, position: Position) -> None:
        self.durable_seq = max(self.durable_seq, position.seq)
        self._release_waiters()

    def _release_waiters(self) -> None:
        self.progress.set()
        if not self._waiters:
            return
        still = []
        for seq, future in self._waiters:
            if future.done():
                continue
            if self.committed(seq):
                future.set_result(None)
            else:
                still.append((seq, future))
        self._waiters = still


class GroupFlusher:
    """Saves every partition with unsaved ops in one Redis transaction per round: with
    many partitions on a node, one fsync'd MULTI instead of one per partition."""

    def __init__(self, store: PartitionStore) -> None:
        self.store = store
        self._dirty: dict[tuple[str, int], PartitionReplica] = {}
        self._task: asyncio.Task[None] | None = None
        self._round_end: asyncio.Future[None] | None = None

    def request(self, replica: PartitionReplica) -> None:
        self._dirty[(replica.queue, replica.partition)] = replica
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def wait(self) -> None:
        """Until the save round in progress ends (at once when the flusher is idle).

        Not until the flusher is idle: under steady load it never is, and waiting for
        that made a replicated write wait for the saves of writes that came after it
        (3-4 rounds: a follower's flush waited 12-16 ms at the median for 4 ms saves).
        A writer whose writes missed this round waits for the next one as well."""
        if self._task is None or self._task.done():
            return
        if self._round_end is None:
            self._round_end = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._round_end)

    def _end_round(self) -> None:
        end, self._round_end = self._round_end, None
        if end is not None and not end.done():
            end.set_result(None)

    async def _run(self) -> None:
        try:
            while self._dirty:
                await self._save_round()
                self._end_round()
        finally:
            self._end_round()

    async def _save_round(self) -> None:
        batch = list(self._dirty.values())
        self._dirty.clear()
        taken = [(r, *r.take_unsaved()) for r in batch if r.durable_seq < r.position.seq]
        if not taken:
            return
        try:
            await self.store.save_many(
                [(r.queue, r.partition, w, pos, r.state) for r, w, pos in taken]
            )
        except Exception as exc:
            for replica, writes, _ in taken:
                replica.save_failed(writes)
                self._dirty[(replica.queue, replica.partition)] = replica
            log.warning("partition save failed; retrying", extra={"error": str(exc)})
            await asyncio.sleep(FLUSH_RETRY_SECONDS)
            return
        for replica, _, position in taken:
            replica.saved(position)
