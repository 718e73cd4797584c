"""Consumers long-polling on this node, woken one at a time when messages arrive, and
other nodes watching this node's partitions for them.

Every waiting consumer used to wake on every new message (an Event per partition), so
with a dozen consumers on a node each publish woke all of them: one took the message,
the others scanned the partitions, found nothing and went back to waiting, and those
that got one returned it alone. Now messages arriving for a queue wake the consumer of
each group that has waited longest, once per loop turn however many partitions got
messages in it; a consumer that fills its batch wakes the next of its group (`pass_on`),
so a burst still spreads over as many consumers as it needs.

A watch is another node asking to hear when messages may be deliverable here (its own
consumers wait there; service.py `_watch`): a notify ends every watch of the queue, since
each stands for a whole node's consumers.

A wake-up that finds no one waiting is not kept: a consumer looks for messages before
it waits, and a watch is answered at once when messages are already there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from typing import TypeVar

# A consumer's place in line, longest waiting first. Leaving the line (a timeout) and
# taking its head both cost no walk of it: with thousands of consumers long-polling one
# queue, a deque's remove() walked the line on every wake-up. (A plain dict would walk
# the deleted entries at its front to find the head.)
Line = OrderedDict[asyncio.Future[None], None]
T = TypeVar("T")


class MessageWaiters:
    def __init__(self) -> None:
        # queue -> group -> the consumers waiting, longest first
        self._waiting: dict[str, dict[str, Line]] = {}
        # queue -> the watches of other nodes
        self._watches: dict[str, set[asyncio.Future[bool]]] = {}
        self._wake_scheduled: set[str] = set()

    def waiting(self, queue: str, group: str) -> int:
        return len(self._waiting.get(queue, {}).get(group, ()))

    def lines(self) -> list[tuple[str, str]]:
        """(queue, group) of every consumer line waiting here."""
        return [(queue, group) for queue, groups in self._waiting.items() for group in groups]

    def watched(self, queue: str) -> bool:
        return bool(self._watches.get(queue))

    async def wait(self, queue: str, group: str, timeout: float) -> None:
        """Until woken for new messages in `queue`, or `timeout` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        line = self._waiting.setdefault(queue, {}).setdefault(group, OrderedDict())
        line[future] = None
        timer = loop.call_later(max(0.0, timeout), _resolve, future, None)
        try:
            await future
        finally:
            timer.cancel()
            line.pop(future, None)  # timed out or cancelled: leave the line
            self._drop_if_empty(queue, group)

    async def watch(self, queue: str, timeout: float) -> bool:
        """True when the next notify of `queue` comes within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        watches = self._watches.setdefault(queue, set())
        watches.add(future)
        timer = loop.call_later(max(0.0, timeout), _resolve, future, False)
        try:
            return await future
        finally:
            timer.cancel()
            watches.discard(future)
            if not watches:
                self._watches.pop(queue, None)

    def notify(self, queue: str) -> None:
        """Messages arrived in `queue`: wake one consumer per group and every watch, at
        the end of this loop turn (so the partitions that got messages in this turn all
        count)."""
        if queue in self._wake_scheduled:
            return
        if queue not in self._waiting and queue not in self._watches:
            return
        self._wake_scheduled.add(queue)
        asyncio.get_running_loop().call_soon(self._wake, queue)

    def pass_on(self, queue: str, group: str) -> None:
        """A consumer of `group` filled its batch (or a watch says another node has
        messages for it): wake the next consumer of that group."""
        line = self._waiting.get(queue, {}).get(group)
        if line:
            _wake_first(line)

    def _wake(self, queue: str) -> None:
        self._wake_scheduled.discard(queue)
        for line in list(self._waiting.get(queue, {}).values()):
            _wake_first(line)
        for future in list(self._watches.get(queue, ())):
            _resolve(future, True)

    def _drop_if_empty(self, queue: str, group: str) -> None:
        groups = self._waiting.get(queue)
        if groups is None:
            return
        if not groups.get(group, True):
            del groups[group]
        if not groups:
            del self._waiting[queue]


def _wake_first(line: Line) -> None:
    while line:
        future, _ = line.popitem(last=False)
        if not future.done():
            future.set_result(None)
            return


def _resolve(future: asyncio.Future[T], value: T) -> None:
    """Set the result unless the future is done already (woken, or cancelled)."""
    with contextlib.suppress(asyncio.InvalidStateError):
        future.set_result(value)
