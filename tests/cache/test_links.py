"""PeerLink: batches of protocol messages to one peer."""

from __future__ import annotations

import asyncio
import time

from service.cache.links import PeerLink
from service.cache.messages import InvAck, Message, PutM


async def sent_batches(messages: list[Message], **options: int) -> list[list[Message]]:
    batches: list[list[Message]] = []
    done = asyncio.Event()

    async def post(peer: str, batch: list[Message]) -> None:
        batches.append(batch)
        if sum(len(b) for b in batches) == len(messages):
            done.set()

    link = PeerLink("n2", post, concurrency=1, **options)
    for message in messages:
        link.put(message)
    task = asyncio.ensure_future(link.run())
    await asyncio.wait_for(done.wait(), 2)
    link.stop()
    await asyncio.wait_for(task, 2)
    return batches


async def test_small_messages_share_one_request() -> None:
    messages: list[Message] = [InvAck(f"k{i}", "n1", i) for i in range(50)]
    assert [len(b) for b in await sent_batches(messages)] == [50]


async def test_large_values_are_split_into_requests_of_a_few_mib() -> None:
    # Values reach 256 KiB; the peer must never get one request of hundreds of MiB.
    big = "x" * 256 * 1024
    messages: list[Message] = [PutM(f"k{i}", "n1", i, 1, big) for i in range(40)]
    batches = await sent_batches(messages, max_batch_bytes=1024 * 1024)
    assert sum(len(b) for b in batches) == 40 and len(batches) == 10
    assert [m.key for b in batches for m in b] == [f"k{i}" for i in range(40)]  # in order


async def test_a_post_left_unanswered_shows_as_a_stall_and_a_failed_one_does_not() -> None:
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    attempts = 0

    async def post(peer: str, batch: list[Message]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await answer  # a peer cut off: no answer, no error
        elif attempts == 2:
            raise ConnectionError("refused")

    link = PeerLink("n2", post, concurrency=1, min_backoff=0.3)
    link.put(InvAck("k", "n1", 1))
    task = asyncio.ensure_future(link.run())
    try:
        await asyncio.sleep(0.2)
        assert 0.15 < link.stalled_for(time.monotonic()) < 1.0
        answer.set_exception(ConnectionError("closed by a probe"))
        await asyncio.sleep(0.1)
        # Backing off after a failure is not a stall: nothing is waiting on the peer.
        assert link.stalled_for(time.monotonic()) == 0.0 and link.down_since is not None
        for _ in range(40):  # backoff 0.3 s, then 0.6 s
            if link.sent:
                break
            await asyncio.sleep(0.05)
        assert attempts == 3 and link.stalled_for(time.monotonic()) == 0.0
        assert link.sent == 1 and link.down_since is None
    finally:
        link.stop()
        await asyncio.wait_for(task, 2)
