"""How long a process takes from its start until it owns a bus name, seen in the bus daemon's
``NameOwnerChanged`` signal (the moment clients can call it). Used for the daemon's start and
its floor (``name_floor.py``), on a private bus on the host and on the lab guest's system bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from bench.common import add_match

BUS_DAEMON = "org.freedesktop.DBus"


async def seconds_to_name(
    bus: MessageBus, name: str, start: Callable[[], Any], limit: float = 120.0
) -> float:
    """Call *start* (which must return at once, or run in a thread when it blocks) and return the
    seconds until *name* gets an owner. The match is added first, so the signal is not missed.

    Raises:
        TimeoutError: nobody owned *name* within *limit* seconds.
        RuntimeError: the bus refused the match rule.
    """
    owned = asyncio.get_running_loop().create_future()

    def on_message(message: Message) -> None:
        if (
            message.member == "NameOwnerChanged"
            and message.sender == BUS_DAEMON
            and message.body[0] == name
            and message.body[2]
            and not owned.done()
        ):
            owned.set_result(time.monotonic())

    rule = (
        f"type='signal',sender='{BUS_DAEMON}',interface='{BUS_DAEMON}',"
        f"member='NameOwnerChanged',arg0='{name}'"
    )
    await add_match(bus, rule)
    bus.add_message_handler(on_message)
    try:
        began = time.monotonic()
        started = asyncio.ensure_future(asyncio.to_thread(start))
        async with asyncio.timeout(limit):
            at: float = await owned
            await started
        return at - began
    finally:
        bus.remove_message_handler(on_message)
        await bus.call(
            Message(
                destination=BUS_DAEMON,
                path="/org/freedesktop/DBus",
                interface=BUS_DAEMON,
                member="RemoveMatch",
                signature="s",
                body=[rule],
            )
        )
