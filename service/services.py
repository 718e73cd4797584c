"""Which services a node runs, and how they are wired to the node.

Each service is an object with `state_machines()`, `attach(runner)` and `async stop()`;
its routes live in `service/api/` and find it on the node. The node wraps every machine
for exactly-once request ids and registers it with the Raft runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from service.cache.service import CacheService, CacheSettings
from service.cache.store import MemoryCacheStore
from service.clock import now_ms
from service.locks.service import LockService, LockUnavailable
from service.queue.service import QueueService
from service.queue.store import MemoryPartitionStore

if TYPE_CHECKING:
    from service.node import Node

CANCEL_FORWARD_TIMEOUT_SECONDS = 5.0


def install_services(node: Node) -> None:
    locks = LockService(node.node_id, node.metrics)

    async def cancel_on_leader(name: str, owner: str, seq: int) -> dict[str, Any]:
        # A wait that timed out on a node that lost leadership meanwhile is cancelled
        # through the current leader (the cancel must go through the log).
        url = node.leader_url()
        if url is None or node.forwarder is None:
            raise LockUnavailable("no leader to cancel the wait on")
        status, body = await node.forwarder.forward(
            "POST",
            f"{url}/v1/locks/{quote(name, safe='')}/cancel",
            {"owner": owner, "seq": seq},
            timeout=CANCEL_FORWARD_TIMEOUT_SECONDS,
            idempotent=True,  # a cancel names the wait by seq: repeating it is harmless
        )
        if status == 200 and isinstance(body, dict):
            if body.get("cancelled"):
                return {"status": "cancelled"}
            left = body.get("expires_in_ms")
            left = left if isinstance(left, int) else body.get("ttl_ms", 0)
            return {"status": "granted", **body, "expires_at_ms": now_ms() + left}
        if status == 404:
            return {"status": "not_waiting"}
        raise LockUnavailable(f"cancel on the leader answered {status}")

    locks.remote_cancel = cancel_on_leader
    node.locks = locks
    node.services.append(locks)

    # The node swaps in its Redis-backed store once its Redis is up (Node._start_raft).
    queues = QueueService(node.node_id, node.metrics, MemoryPartitionStore())
    node.queues = queues
    node.services.append(queues)

    # Likewise: the node gives the cache its Redis-backed store before attach.
    settings = node.settings
    cache = CacheService(
        node.node_id,
        node.metrics,
        MemoryCacheStore(),
        CacheSettings(
            max_entries=settings.cache_max_entries,
            max_bytes=settings.cache_max_bytes,
            policy="lfu" if settings.cache_policy == "lfu" else "lru",
            lease_ms=settings.cache_lease_ms,
            # A write must be able to wait out one lease of a sharer that does not answer.
            write_timeout_ms=max(7_000, settings.cache_lease_ms + 2_000),
        ),
    )
    node.cache = cache
    node.services.append(cache)
