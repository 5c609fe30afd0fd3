"""Owning the well-known name org.vfiocaps: asked for once, without queueing, given back on exit."""

from __future__ import annotations

import asyncio
import logging

from dbus_fast import NameFlag, RequestNameReply

from ..errors import BusError, NameTakenError
from .connection import ResilientMessageBus
from .names import BUS_NAME

log = logging.getLogger(__name__)

# On the way out, how long the bus may take to confirm that the name is released.
NAME_RELEASE_SECONDS = 2.0


async def own_name(bus: ResilientMessageBus) -> None:
    """Request the well-known name without queueing.

    Raises:
        NameTakenError: another connection owns it.
        BusError: the bus refused the request.
    """
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except Exception as err:
        raise BusError(f"cannot request the name {BUS_NAME}: {err}") from err
    if reply is RequestNameReply.EXISTS:
        raise NameTakenError(f"{BUS_NAME} is already owned by another process on this bus")
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise BusError(f"unexpected reply to the request for {BUS_NAME}: {reply}")


async def release_name(bus: ResilientMessageBus) -> None:
    """Give the well-known name back: its owner going away tells every client that all of the
    daemon's objects are gone. Raises nothing; a bus that is already gone took the name along.
    """
    if not bus.connected:
        return
    try:
        async with asyncio.timeout(NAME_RELEASE_SECONDS):
            await bus.release_name(BUS_NAME)
    except TimeoutError:
        log.debug("the bus did not answer the release of %s in time", BUS_NAME)
    except Exception as err:  # noqa: BLE001 - on the way out a failing bus is only worth a line
        log.debug("releasing %s: %s", BUS_NAME, err)
