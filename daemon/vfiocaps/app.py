"""Assembling the daemon: discovery, prober, store, engine and the D-Bus adaptor, run together."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable

from . import __version__, fingerprint
from .bus.adaptor import BusAdaptor
from .bus.connection import close_bus, connect_bus, wait_disconnected
from .bus.names import BUS_NAME
from .bus.ownership import own_name, release_name
from .config import Config
from .discovery import Discovery
from .engine import Engine, TypeView
from .errors import BusError, VfiocapsError
from .nfdfile import FeatureFile
from .nfdlabels import LabelsRecord, NfdLabelWriter, remove_stale_labels
from .notify import Notifier, NotifyError, ServiceStatus, watchdog_interval
from .prober import Prober
from .store import CapabilityStore

log = logging.getLogger("vfiocaps")


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


async def _keep_watchdog(notifier: Notifier, interval: float) -> None:
    try:
        await notifier.keep_watchdog(interval)
    except NotifyError as err:
        log.error("watchdog pings stopped: %s", err)


def label_writer(config: Config, engine: Engine) -> NfdLabelWriter | None:
    """The NFD label writer the configuration asks for, or None (then a feature file an
    earlier run left is removed)."""
    record = LabelsRecord(config.cache_dir / "nfd-labels-directory")
    if config.nfd_features_dir is None:
        remove_stale_labels(record, None)
        return None
    feature_file = FeatureFile(config.nfd_features_dir)
    return NfdLabelWriter(
        feature_file,
        engine.types,
        fingerprint_of=_fingerprint_of,
        emulated=config.emulated,
        record=record,
    )


def _fingerprint_of(view: TypeView) -> str:
    """A probed type's migration fingerprint (JSON), as the NFD labels hash it."""
    if view.driver is None or view.capabilities is None:
        return ""
    return fingerprint.for_type(
        view.driver, view.type_id, view.device_api, view.capabilities, view.parent_pci_id
    ).to_json()


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run the daemon until *stop* is set.

    The name is requested only once the objects are exported, so the first caller already
    finds the root object; devices appear as the engine learns them.

    Raises:
        BusError: the bus is unreachable, the name is taken, or the connection is lost.
    """
    prober = Prober(config)
    # Before anything is discovered or probed: nodes a killed process left lent go back.
    prober.recover_grants()
    bus = await connect_bus(config.bus)
    engine = Engine(config, Discovery(config), prober, CapabilityStore(config.database_path))
    adaptor = BusAdaptor(bus, engine, config)
    labels = label_writer(config, engine)
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
        if labels is not None:  # from a learned host on: never an empty file at start
            engine.subscribe(labels)
            labels.start()
        bus.announcing = True
        await own_name(bus)
        named = True
        prober.allow_probes()
        log.info("vfiocapsd %s serving %s on the %s", __version__, BUS_NAME, config.bus.describe())
        if config.emulated:
            log.warning("this host is emulated: the answers describe no real hardware")
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
        if labels is not None:
            engine.unsubscribe(labels)
            await labels.close()
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
