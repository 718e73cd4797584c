"""Outgoing protocol messages to one peer: batched, retried, deduplicated.

Why one outbox per peer with a few requests in flight: whatever queues while the requests
are out goes in the next one, so batches grow with the load (like the Raft runner's
group commit) and a busy link costs one peer call per batch, not per message (a call
on the node's call socket, service/transport/calls.py); a few of them at once
(`concurrency`) keep one slow request from holding up the rest. Messages stay in the
outbox until the peer has accepted them (an answer 200 means it stepped them into its
cores), so a peer that is down or restarting gets them when it is back;
the protocol tolerates the duplicates a timed-out-but-processed request causes.

Bounds: a message waiting longer than `max_age` is dropped (the cores re-send what still
matters: requests, forwards, invalidations and grants), an identical message already
queued is not queued twice (re-sends every second to a dead peer do not pile up), and the
backoff between failed attempts grows to `max_backoff`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from service.cache.messages import Message

log = logging.getLogger("dsync.cache")

Post = Callable[[str, list[Message]], Awaitable[None]]


class PeerLink:
    def __init__(
        self,
        peer: str,
        post: Post,
        *,
        concurrency: int = 4,
        max_batch: int = 2_000,
        max_batch_bytes: int = 8 * 1024 * 1024,
        max_age: float = 60.0,
        min_backoff: float = 0.05,
        max_backoff: float = 1.0,
    ) -> None:
        self.peer = peer
        self._post = post
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.max_age = max_age
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._queue: deque[tuple[float, Message]] = deque()
        self._queued: set[Message] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self.sent = 0  # messages accepted by the peer
        self.batches = 0
        self.failures = 0  # failed attempts
        self.expired = 0  # messages dropped after max_age
        self.down_since: float | None = None  # monotonic time of the first failure in a row
        # Start (monotonic) of each post still waiting for the peer, by worker.
        self._posting: dict[int, float] = {}

    def put(self, message: Message) -> None:
        if message in self._queued:
            return
        self._queued.add(message)
        self._queue.append((time.monotonic(), message))
        self._wake.set()

    def stalled_for(self, now: float) -> float:
        """How long the oldest post still waiting for the peer has waited (0 if none).
        A peer cut off by a network partition does not refuse a post, it never answers
        it; the owner probes such a peer (CallBatcher.probe) instead of waiting out the
        call's timeout."""
        return now - min(self._posting.values()) if self._posting else 0.0

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(self.concurrency)))

    async def _worker(self, worker: int) -> None:
        backoff = self.min_backoff
        while not self._stopping:
            if not self._queue:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            self._expire()
            batch = self._take_batch()
            if not batch:
                continue
            self._posting[worker] = time.monotonic()
            try:
                await self._post(self.peer, [m for _, m in batch])
            except Exception as exc:  # any failure: keep the messages, try again later
                del self._posting[worker]
                self._queue.extendleft(reversed(batch))
                self.failures += 1
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.info(
                        "cache peer unreachable",
                        extra={"peer": self.peer, "queued": len(self._queue), "error": repr(exc)},
                    )
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            del self._posting[worker]
            if self.down_since is not None:
                down_s = round(time.monotonic() - self.down_since, 3)
                log.info("cache peer reachable again", extra={"peer": self.peer, "down_s": down_s})
                self.down_since = None
            backoff = self.min_backoff
            self.batches += 1
            self.sent += len(batch)
            for _, message in batch:
                self._queued.discard(message)

    def _take_batch(self) -> list[tuple[float, Message]]:
        """Up to max_batch messages and about max_batch_bytes of values (at least one):
        values are up to 256 KiB each, and one request should stay a few MiB."""
        batch: list[tuple[float, Message]] = []
        size = 0
        while self._queue and len(batch) < self.max_batch:
            if batch and size >= self.max_batch_bytes:
                break
            item = self._queue.popleft()
            batch.append(item)
            size += len(getattr(item[1], "data", None) or "") + 64
        return batch

    def __len__(self) -> int:
        return len(self._queue)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.max_age
        dropped = 0
        while self._queue and self._queue[0][0] < cutoff:
            _, message = self._queue.popleft()
            self._queued.discard(message)
            dropped += 1
        if dropped:
            self.expired += dropped
            log.warning(
                "cache messages expired undelivered",
                extra={"peer": self.peer, "dropped": dropped, "max_age_s": self.max_age},
            )


__all__ = ["PeerLink", "Post"]
