"""A polkit text agent for vfiocapsctl's calls from a terminal, started as systemctl starts one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

log = logging.getLogger("vfiocaps.ctl")

AGENT = "pkttyagent"
# How long the agent may take to register with polkit before the call goes ahead without it.
REGISTER_SECONDS = 5.0


async def _registered(notify: int, agent: asyncio.subprocess.Process) -> None:
    """Return when the agent closed its notification descriptor (registered) or exited."""
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not closed.done():
            closed.set_result(None)

    loop.add_reader(notify, readable)
    exited: asyncio.Future[int] = asyncio.ensure_future(agent.wait())
    waits: set[asyncio.Future[Any]] = {closed, exited}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(notify)
        exited.cancel()
        closed.cancel()


@contextlib.asynccontextmanager
async def tty_agent(wanted: bool, program: str = AGENT) -> AsyncIterator[None]:
    """Run a text authentication agent for this process while the block runs, if *wanted*.

    As systemctl does: only for a caller who is not root (root is never asked), with the agent
    as a fallback that leaves a desktop's agent in charge, and waiting for it to register
    before the call is made. Without polkit or the agent the call goes ahead unchanged.
    """
    path = shutil.which(program) if wanted and os.geteuid() != 0 else None
    if path is None:
        yield
        return
    notify_read, notify_write = os.pipe2(os.O_CLOEXEC)
    agent: asyncio.subprocess.Process | None = None
    try:
        try:
            # The agent talks to the user on this terminal: it inherits stdin and stdout.
            agent = await asyncio.create_subprocess_exec(
                path, "--notify-fd", str(notify_write), "--fallback", pass_fds=(notify_write,)
            )
        except OSError as err:
            log.debug("cannot start %s: %s", program, err)
        finally:
            os.close(notify_write)
        if agent is not None:
            try:
                async with asyncio.timeout(REGISTER_SECONDS):
                    await _registered(notify_read, agent)
            except TimeoutError:
                log.debug("%s did not register within %.0f s", program, REGISTER_SECONDS)
        yield
    finally:
        os.close(notify_read)
        if agent is not None:
            await _stop(agent)


async def _stop(agent: asyncio.subprocess.Process) -> None:
    """End the agent: asked first, killed when it does not go within a few seconds."""
    if agent.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            agent.terminate()
    try:
        async with asyncio.timeout(REGISTER_SECONDS):
            await asyncio.shield(agent.wait())
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            agent.kill()
        await agent.wait()
