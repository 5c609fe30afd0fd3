"""Assembling the daemon: discovery, prober, store, engine and the D-Bus adaptor, run together."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from dataclasses import replace

from dbus_fast import NameFlag, RequestNameReply

from . import __version__
from .bus.adaptor import BusAdaptor
from .bus.connection import ResilientMessageBus, close_bus, connect_bus, wait_disconnected
from .bus.names import BUS_NAME
from .capabilities import ProbeReport
from .config import Config
from .discovery import Discovery
from .engine import DeviceView, Engine, EngineStatus
from .errors import BusError, NameTakenError, VfiocapsError
from .model import Device, Parent
from .notify import Notifier, NotifyError, watchdog_interval
from .prober import Prober, ProbeTarget
from .store import CapabilityStore, QemuIdentity

log = logging.getLogger("vfiocaps")

# On the way out, how long the bus may take to confirm that the name is released.
NAME_RELEASE_SECONDS = 2.0


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


def _notifier() -> Notifier | None:
    try:
        return Notifier.from_environment(os.environ)
    except NotifyError as err:
        log.warning("not notifying the service manager: %s", err)
        return None


async def _notify(message: Awaitable[None]) -> None:
    try:
        await message
    except NotifyError as err:
        log.warning("%s", err)


async def _stop_early(engine_task: asyncio.Task[None]) -> None:
    """The engine ended, or a stop came, before the daemon served.

    Raises:
        VfiocapsError: the engine failed.
    """
    if not engine_task.done():
        engine_task.cancel()
        await asyncio.gather(engine_task, return_exceptions=True)
        return
    error = None if engine_task.cancelled() else engine_task.exception()
    if error is not None:
        raise VfiocapsError(f"the engine stopped: {error}") from error


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
        await asyncio.wait_for(bus.release_name(BUS_NAME), NAME_RELEASE_SECONDS)
    except TimeoutError:
        log.debug("the bus did not answer the release of %s in time", BUS_NAME)
    except Exception as err:  # noqa: BLE001 - on the way out a failing bus is only worth a line
        log.debug("releasing %s: %s", BUS_NAME, err)


class ServiceStatus:
    """Tells the service manager how the daemon is doing (``STATUS=``), at most once a second."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._latest: EngineStatus | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def describe(status: EngineStatus) -> str:
        """One line for ``systemctl status``."""
        probing = ", probing" if status.probing else ""
        cache = status.cache_state.value + (f": {status.cache_error}" if status.cache_error else "")
        return (
            f"{status.device_count} devices, {status.probes_launched} probes since start"
            f"{probing}; cache {cache}"
        )

    def status_changed(self, status: EngineStatus) -> None:
        self._latest = status
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send_soon())

    async def _send_soon(self) -> None:
        await asyncio.sleep(1.0)
        if self._latest is not None:
            try:
                await self._notifier.status(self.describe(self._latest))
            except NotifyError as err:
                log.warning("%s", err)

    def device_added(self, view: DeviceView) -> None:
        pass

    def device_changed(self, view: DeviceView) -> None:
        pass

    def device_removed(self, device_id: str) -> None:
        pass

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None:
        pass

    async def close(self) -> None:
        """Stop a pending status update."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _keep_watchdog(notifier: Notifier, interval: float) -> None:
    try:
        await notifier.keep_watchdog(interval)
    except NotifyError as err:
        log.error("watchdog pings stopped: %s", err)


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
    notifier = _notifier()
    reporter = ServiceStatus(notifier) if notifier else None
    watchdog: asyncio.Task[None] | None = None
    named = False
    try:
        # Learn the host before taking the name: nobody can be listening to org.vfiocaps yet,
        # so the objects are exported silently, and the first caller finds them all.
        bus.announcing = False
        adaptor.start()
        engine_task = asyncio.create_task(engine.run(), name="engine")
        started = asyncio.ensure_future(engine.wait_started())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {started, stopping, engine_task}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            started.cancel()
            stopping.cancel()
        if engine_task.done() or stop.is_set():
            await _stop_early(engine_task)
            return
        bus.announcing = True
        await own_name(bus)
        named = True
        log.info("vfiocapsd %s serving %s on the %s", __version__, BUS_NAME, config.bus.describe())
        if notifier is not None and reporter is not None:
            engine.subscribe(reporter)
            await _notify(notifier.ready(f"serving {BUS_NAME}"))
            reporter.status_changed(engine.status)
            interval = watchdog_interval(config.watchdog_usec)
            if interval is not None:
                watchdog = asyncio.create_task(_keep_watchdog(notifier, interval))
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
        if notifier is not None:
            await _notify(notifier.stopping("stopping"))
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        if reporter is not None:
            engine.unsubscribe(reporter)
            await reporter.close()
        if named:
            await release_name(bus)
        # Clients saw the name go; one InterfacesRemoved per device (thousands of them) would
        # only flood the bus on the way out.
        bus.announcing = False
        adaptor.stop()
        if engine_task is not None and not engine_task.done():
            engine_task.cancel()
            await asyncio.gather(engine_task, return_exceptions=True)
        await close_bus(bus)
