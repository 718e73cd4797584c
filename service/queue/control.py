"""Queue control: in-sync replica sets, partition leader moves, trimming, gauges.

Partition leaders shrink the ISR when a follower is unreachable or lags, and grow it
again once the follower has caught up; the Raft leader moves leadership of a dead node's
partitions to live ISR members (a new epoch) and back to the preferred replica later.
"""

from __future__ import annotations

import asyncio
import math

from service.queue.base import (
    CONTROL_INTERVAL_SECONDS,
    DEAD_AFTER_SECONDS,
    ISR_LAG_SECONDS,
    PEER_DOWN_SECONDS,
    PUBLISH_TIMEOUT_SECONDS,
    TRIM_INTERVAL_SECONDS,
    QueueError,
    QueueServiceBase,
    log,
)
from service.queue.meta import PartitionMeta
from service.raft.core import RaftError, Role
from service.statemachine import Command


class ControlMixin(QueueServiceBase):
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
        # Reachability once per follower and pass, not per partition: every led
        # partition is visited 10 times a second, and with thousands of them this walk
        # was most of an idle node's CPU.
        reachable_peers: dict[str, bool] = {}
        for (queue, partition), replica in list(self.leading_replicas.items()):
            meta = self.meta.get(queue)
            if meta is None:
                continue
            part = meta.partitions[partition]
            if part.epoch != replica.leader_epoch:
                continue
            for follower in part.replicas:
                if follower == self.node_id:
                    continue
                reachable = reachable_peers.get(follower)
                if reachable is None:
                    heard = max(self._peer_ok.get(follower, 0.0), self._started_at)
                    reachable = reachable_peers[follower] = now - heard < PEER_DOWN_SECONDS
                if reachable and replica.follower_acked.get(follower, -1) >= replica.position.seq:
                    replica.follower_caught_up_at[follower] = now
                    if follower in part.isr:
                        continue  # in sync and in the ISR: nothing to decide
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
                result = await self.propose_meta(
                    "queue.isr", {"queue": queue, "partition": partition,
                                  "epoch": part.epoch, "isr": isr, "expect": list(part.isr)},
                )
                if result.get("status") == "ok":
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
        live_nodes = {node for node in led if self._live(node, now)}  # once per pass
        for meta in self.meta.queues():
            for index, part in enumerate(meta.partitions):
                if part.leader in live_nodes and part.leader == part.replicas[0]:
                    continue  # its preferred leader leads, alive: nothing to move
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

    async def hand_over_after_loss(self) -> None:
        """This node's storage was lost: leave the ISR of every partition (handing the
        leadership of those it led to another in-sync replica), so that no acknowledged
        message depends on its empty copies; then lead again as the metadata says. The
        partition leaders add it back once it has caught up, as after any outage."""
        runner = self.runner
        while runner is not None and runner.core.rejoining and not self._stopping:
            await asyncio.sleep(0.1)  # the metadata is complete once Raft caught up
        alone: set[tuple[str, int]] = set()  # partitions with no other in-sync replica
        # Partitions this node has left. Each is left once only: its leader adds the
        # node back as soon as it has caught up (and the Raft leader may then make it
        # the leader again, as the preferred replica), and leaving again would start
        # that over: a loop of moves that a fast catch-up kept going for as long as a
        # test watched (hundreds of epochs in 30 s). Nothing else puts it back: ISR
        # changes carry the ISR they were computed from (`expect`).
        left: set[tuple[str, int]] = set()
        while not self._stopping:
            changes: list[tuple[tuple[str, int], str, dict[str, object]]] = []
            for meta in self.meta.queues():
                for index, part in enumerate(meta.partitions):
                    key = (meta.name, index)
                    if self.node_id not in part.isr or key in left:
                        continue
                    others = [n for n in part.isr if n != self.node_id]
                    args = {"queue": meta.name, "partition": index, "epoch": part.epoch,
                            "isr": others}
                    if part.leader != self.node_id:
                        changes.append((key, "queue.isr", {**args, "expect": list(part.isr)}))
                    elif others:
                        changes.append((key, "queue.move", {**args, "leader": others[0]}))
                    elif key not in alone:
                        alone.add(key)
                        log.error(
                            "storage lost and no other in-sync replica: the messages "
                            "this partition held only here are gone",
                            extra={"queue": meta.name, "partition": index},
                        )
            if not changes:
                break
            for key, op, args in changes:
                try:
                    result = await self.propose_meta(op, dict(args))
                except QueueError as exc:
                    log.info("handing over after storage loss", extra={"error": exc.message})
                    continue
                if result.get("status") == "ok":
                    left.add(key)
            await asyncio.sleep(0.2)
        log.info("queue partitions handed over after storage loss")
        self.storage_lost = False
        self._reconcile_needed.set()

    def _trim_and_gauge(self) -> None:
        for (queue, partition), replica in list(self.leading_replicas.items()):
            trim = replica.state.plan_trim()
            if trim is not None:
                replica.apply_local([trim], lazy=True)
            lags = [replica.state.lag(g) for g in replica.state.groups] or [len(replica.state)]
            self.metrics.queue_lag.labels(self.node_id, queue, str(partition)).set(max(lags))

