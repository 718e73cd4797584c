"""PeerLink: batches of protocol messages to one peer."""

from __future__ import annotations

import asyncio

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
