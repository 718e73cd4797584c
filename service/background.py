"""One named background task a component starts once and stops by cancelling it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class BackgroundTask:
    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def every(cls, name: str, seconds: float, action: Callable[[], object]) -> BackgroundTask:
        """A task that runs `action` every `seconds`, first after one interval."""

        async def repeat() -> None:
            while True:
                await asyncio.sleep(seconds)
                action()

        return cls(name, repeat)

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the task unless it is already running."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Cancel the task and wait until it has ended; a no-op when not running."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
