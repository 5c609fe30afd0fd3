"""Background tasks: referenced while they run, failures logged, cancelled and awaited together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine

log = logging.getLogger(__name__)


class TaskSet:
    """Keeps a reference to every task it starts until the task ends; :meth:`stop` cancels
    them all and waits for each to end."""

    def __init__(self, what: str = "background") -> None:
        self._what = what
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[object, object, None], name: str | None = None) -> None:
        """Run *coro* as a task (named *name*); an exception it ends with is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s task failed (%s)", self._what, task.get_name(), exc_info=task.exception())

    async def settle(self, seconds: float) -> None:
        """Wait at most *seconds* for the running tasks to end by themselves (none is
        cancelled). Raises nothing but the cancellation of the caller itself."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=seconds)

    async def stop(self) -> None:
        """Cancel every task and wait until all have ended. Raises nothing but the cancellation
        of the caller itself (a task's own cancellation or failure is not raised)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
