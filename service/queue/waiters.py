"""Consumers long-polling on this node, woken one at a time when messages arrive.

Every waiting consumer used to wake on every new message (an Event per partition), so
with a dozen consumers on a node each publish woke all of them: one took the message,
the others scanned the partitions, found nothing and went back to waiting, and those
that got one returned it alone. Now messages arriving for a queue wake the consumer of
each group that has waited longest, once per loop turn however many partitions got
messages in it; a consumer that fills its batch wakes the next of its group (`pass_on`),
so a burst still spreads over as many consumers as it needs.

A wake-up that finds no one waiting is not kept: a consumer looks for messages before
it waits, and waits in slices (LONG_POLL_SLICE_SECONDS) that end with another look.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class MessageWaiters:
    def __init__(self) -> None:
        # queue -> group -> futures of the consumers waiting, longest first
        self._waiting: dict[str, dict[str, deque[asyncio.Future[None]]]] = {}
        self._wake_scheduled: set[str] = set()

    def waiting(self, queue: str, group: str) -> int:
        return len(self._waiting.get(queue, {}).get(group, ()))

    async def wait(self, queue: str, group: str, timeout: float) -> None:
        """Until woken for new messages in `queue`, or `timeout` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        line = self._waiting.setdefault(queue, {}).setdefault(group, deque())
        line.append(future)
        timer = loop.call_later(max(0.0, timeout), _settle, future)
        try:
            await future
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                line.remove(future)  # timed out or cancelled: leave the line
            self._drop_if_empty(queue, group)

    def notify(self, queue: str) -> None:
        """Messages arrived in `queue`: wake one consumer per group, at the end of this
        loop turn (so the partitions that got messages in this turn all count)."""
        if queue in self._wake_scheduled or queue not in self._waiting:
            return
        self._wake_scheduled.add(queue)
        asyncio.get_running_loop().call_soon(self._wake, queue)

    def pass_on(self, queue: str, group: str) -> None:
        """A consumer of `group` filled its batch: there may be more for the next one of
        that group (the other groups were woken for these messages already)."""
        line = self._waiting.get(queue, {}).get(group)
        if line:
            _wake_first(line)

    def _wake(self, queue: str) -> None:
        self._wake_scheduled.discard(queue)
        for line in list(self._waiting.get(queue, {}).values()):
            _wake_first(line)

    def _drop_if_empty(self, queue: str, group: str) -> None:
        groups = self._waiting.get(queue)
        if groups is None:
            return
        if not groups.get(group, True):
            del groups[group]
        if not groups:
            del self._waiting[queue]


def _wake_first(line: deque[asyncio.Future[None]]) -> None:
    while line:
        future = line.popleft()
        if not future.done():
            future.set_result(None)
            return


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
