"""Queue replication: the partition leader pushes its op stream to every replica.

Leader side: one sender per follower node, one request in flight at a time carrying the
new ops of every partition that node replicates (later ops ride in the next request);
a follower that is behind the leader's buffer, or diverged, gets the whole partition.
Follower side: ops are accepted only from the current epoch, only when they follow the
replica's position exactly, and acknowledged only once durable in its Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from service.queue.base import (
    HEARTBEAT_SECONDS,
    MAX_OPS_PER_ITEM,
    REPLICATE_TIMEOUT_SECONDS,
    QueueServiceBase,
    log,
)
from service.queue.ops import decode_op
from service.queue.partition import PartitionState
from service.queue.replica import PartitionReplica
from service.queue.store import Position

MAX_REPLICATE_BYTES = 8 * 1024 * 1024


def _op_bytes(op: list[Any]) -> int:
    """About what an encoded op weighs on the wire (its strings dominate)."""
    return 16 + sum(len(f) for f in op if isinstance(f, str | bytes))


class ReplicationMixin(QueueServiceBase):
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
        # Bytes of op payload one request may carry: a follower far behind on large
        # messages catches up over several requests of a few MiB, not one of hundreds.
        budget = MAX_REPLICATE_BYTES
        for (queue, partition), replica in list(self.leading_replicas.items()):
            acked = replica.follower_acked.get(peer)
            if acked is not None and acked >= replica.position.seq:
                continue  # caught up (most partitions, most heartbeats: checked first)
            meta = self.meta.get(queue)
            if meta is None or peer not in meta.partitions[partition].replicas:
                continue
            # "upto": the leader's end when this was sent; a follower that acks it was
            # caught up at that moment (what ISR membership is judged by).
            base = {"q": queue, "p": partition, "epoch": replica.leader_epoch,
                    "upto": replica.position.seq}
            if acked is None:
                # Probe: where is the follower? (its reply says, or it agrees and is done)
                items.append({**base, "prev": [replica.position.seq, replica.position.stamp],
                              "ops": []})
                continue
            if budget <= 0:
                more = True  # the next request
                continue
            ops = replica.ops_after(acked, MAX_OPS_PER_ITEM)
            prev_stamp = replica.stamp_at(acked)
            if ops is None or prev_stamp is None:
                items.append({**base, "replace": replica.state.export(),
                              "seq": replica.position.seq, "stamp": replica.position.stamp})
                budget = 0  # a whole state: nothing more in this request
                continue
            taken = 0
            for count, shipped in enumerate(ops, 1):
                taken += _op_bytes(shipped.op)
                if taken >= budget:
                    ops = ops[:count]
                    break
            budget -= taken
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
            self._note_replication_reply(replica, peer, item, reply)
            meta = self.meta.get(replica.queue)
            if meta is not None:
                replicas = meta.partitions[replica.partition].replicas
                replica.release_acked_ops(f for f in replicas if f != self.node_id)

    def _note_replication_reply(
        self, replica: PartitionReplica, peer: str, item: dict[str, Any], reply: dict[str, Any]
    ) -> None:
        seq, stamp = int(reply.get("seq", 0)), int(reply.get("stamp", 0))
        if reply.get("ok"):
            replica.follower_ack(peer, seq)
            if seq >= item["upto"]:
                replica.follower_caught_up_at[peer] = asyncio.get_running_loop().time()
        elif reply.get("error"):
            return  # stale epoch / unknown queue: metadata will catch up
        elif replica.agrees(seq, stamp):
            # Where the follower really is: it may be behind what it acked before
            # (its storage was lost), and then catches up from there; until it has,
            # it must not count as caught up because it once was.
            if seq < replica.follower_acked.get(peer, -1):
                replica.follower_caught_up_at.pop(peer, None)
            replica.follower_acked[peer] = seq
        else:
            # Diverged or too far behind: the next round sends the whole state.
            replica.follower_acked[peer] = -1
            replica.follower_caught_up_at.pop(peer, None)

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

