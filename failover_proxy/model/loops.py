"""Long-running tasks kept by key: the probe of each endpoint, the resolution of each name.

A new generation (a reload, a DNS answer) hands the owner the keys it wants now: loops whose
target carries on keep running (with whatever streak or schedule they hold), loops whose target
changed start again, and the rest stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Container, Coroutine
from typing import Any, Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class TaskLoops(Generic[K, T]):
    def __init__(self) -> None:
        self._running: dict[K, tuple[T, asyncio.Task[None]]] = {}

    def target(self, key: K) -> T | None:
        """What the loop of `key` runs for, or None when none runs."""
        running = self._running.get(key)
        return running[0] if running is not None else None

    def start(self, key: K, target: T, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as the loop of `key` (in place of the one running, if any)."""
        old = self._running.pop(key, None)
        if old is not None:
            old[1].cancel()
        self._running[key] = (target, asyncio.get_running_loop().create_task(work))

    def keep_only(self, wanted: Container[K]) -> None:
        """Stop every loop whose key is not in `wanted`."""
        for key in [key for key in self._running if key not in wanted]:
            self._running.pop(key)[1].cancel()

    async def stop(self) -> None:
        tasks = [task for _, task in self._running.values()]
        self._running.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
