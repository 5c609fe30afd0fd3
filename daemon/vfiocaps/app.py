"""Assembling the daemon: discovery, prober, store, engine and the D-Bus adaptor, run together."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from dbus_fast import NameFlag, RequestNameReply

from . import __version__
from .bus.adaptor import BusAdaptor
from .bus.connection import ResilientMessageBus, close_bus, connect_bus, wait_disconnected
from .bus.names import BUS_NAME
from .capabilities import ProbeReport
from .config import Config
from .discovery import Discovery
from .engine import Engine
from .errors import BusError, NameTakenError, VfiocapsError
from .model import Device, Parent
from .prober import Prober, ProbeTarget
from .store import CapabilityStore, QemuIdentity

log = logging.getLogger("vfiocaps")


class ProberRunner:
    """The engine's view of the prober: devices in, reports out."""

    def __init__(self, prober: Prober) -> None:
        self._prober = prober

    async def qemu_identity(self) -> QemuIdentity:
        """The QEMU binary's identity.

        Raises:
            ProbeError: the binary is missing or does not answer ``--version``.
        """
        identity = await self._prober.qemu_identity()
        return QemuIdentity(str(identity.path), identity.version, identity.ctime_ns)

    async def probe(self, device: Device, parent: Parent | None) -> ProbeReport:
        """Probe *device*; device-level failures are in the report, not raised."""
        if device.driver is None and parent is not None and parent.driver is not None:
            device = replace(device, driver=parent.driver)
        return await self._prober.probe(ProbeTarget.from_device(device))


async def own_name(bus: ResilientMessageBus) -> None:
    """Request the well-known name without queueing.

    Raises:
        NameTakenError: another connection owns it.
        BusError: the bus refused the request.
    """
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except asyncio.CancelledError:
        raise
    except Exception as err:
        raise BusError(f"cannot request the name {BUS_NAME}: {err}") from err
    if reply is RequestNameReply.EXISTS:
        raise NameTakenError(f"{BUS_NAME} is already owned by another process on this bus")
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise BusError(f"unexpected reply to the request for {BUS_NAME}: {reply}")


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run the daemon until *stop* is set.

    The name is requested only once the objects are exported, so the first caller already
    finds the root object; devices appear as the engine learns them.

    Raises:
        BusError: the bus is unreachable, the name is taken, or the connection is lost.
    """
    bus = await connect_bus(config.bus)
    engine = Engine(
        config,
        Discovery(config),
        ProberRunner(Prober(config)),
        CapabilityStore(config.database_path),
    )
    adaptor = BusAdaptor(bus, engine, config)
    engine_task: asyncio.Task[None] | None = None
    try:
        adaptor.start()
        await own_name(bus)
        engine_task = asyncio.create_task(engine.run(), name="engine")
        log.info("vfiocapsd %s serving %s on the %s", __version__, BUS_NAME, config.bus.describe())
        waits = {
            asyncio.ensure_future(wait_disconnected(bus)): "bus",
            asyncio.ensure_future(stop.wait()): "stop",
            engine_task: "engine",
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task, what in waits.items():
                if what != "engine":
                    task.cancel()
        reasons = {waits[task] for task in done}
        if "engine" in reasons and not engine_task.cancelled():
            error = engine_task.exception()
            raise VfiocapsError(f"the engine stopped: {error}") from error
        if "bus" in reasons:
            raise BusError(f"lost the connection to the {config.bus.describe()}")
    finally:
        adaptor.stop()
        if engine_task is not None and not engine_task.done():
            engine_task.cancel()
            await asyncio.gather(engine_task, return_exceptions=True)
        await close_bus(bus)
