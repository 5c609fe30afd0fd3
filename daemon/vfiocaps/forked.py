"""A child forked from the daemon (not a program it executes): waiting for it without blocking
the loop, within a time limit, and killing and reaping it, also when the wait is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


async def reaped_in_time(pid: int, limit: float) -> int | None:
    """The wait status of the child *pid* once it has ended, or ``None`` when it was killed
    after *limit* seconds. A cancellation kills and reaps it, then propagates.

    Raises:
        OSError: see :func:`_wait_child` (the child is reaped).
    """
    try:
        async with asyncio.timeout(limit):
            return await _wait_child(pid)
    except TimeoutError:
        await _kill_and_reap(pid)
        return None
    except asyncio.CancelledError:
        await _kill_and_reap(pid)
        raise


async def _kill_and_reap(pid: int) -> None:
    """SIGKILL the child *pid* and wait until it is reaped; a cancellation that arrives
    meanwhile is re-raised once it is."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    waiting = asyncio.ensure_future(_wait_child(pid))
    cancelled = False
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            cancelled = True
    with contextlib.suppress(OSError):  # reaped all the same
        waiting.result()
    if cancelled:
        raise asyncio.CancelledError


async def _wait_child(pid: int) -> int:
    """Wait (without blocking the loop) until the child *pid* ends, reap it and return its wait
    status. A cancellation leaves it unreaped.

    Raises:
        OSError: no pidfd for it (Linux before 5.3, or no descriptor left); it is killed and
            reaped then.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        _kill_and_reap_now(pid)
        raise
    loop = asyncio.get_running_loop()
    try:
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await ended
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    return _reap_ended(pid)


def _reap_ended(pid: int) -> int:
    """Reap the child *pid*, which has ended (its pidfd said so: this does not wait), and
    return its wait status."""
    return os.waitpid(pid, os.WNOHANG)[1]


def _kill_and_reap_now(pid: int) -> None:
    """SIGKILL the child *pid* and reap it; it ends at once unless the kernel holds it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
