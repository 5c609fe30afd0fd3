"""Assembling the daemon: discovery, prober, store, engine, bus adaptor and outputs, together."""

from __future__ import annotations

import asyncio
import logging

from . import __version__
from .bus.adaptor import BusAdaptor
from .bus.connection import ResilientMessageBus, close_bus, connect_bus, wait_disconnected
from .bus.names import BUS_NAME
from .bus.ownership import own_name, release_name
from .config import Config
from .discovery import Discovery
from .engine import Engine
from .errors import BusError, VfiocapsError
from .outputs import build_outputs
from .prober import Prober
from .runstate import Lifecycle
from .store import CapabilityStore

log = logging.getLogger("vfiocaps")


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run the daemon until *stop* is set: learn the host with the objects exported silently,
    take the name and serve, then give the name back before the objects go.

    Raises:
        BusError: the bus is unreachable, the name is taken, or the connection is lost.
        VfiocapsError: the engine failed.
    """
    lifecycle = Lifecycle()
    prober = Prober(config, lifecycle=lifecycle)
    prober.recover_grants()  # before anything is discovered or probed: lent nodes go back
    bus = await connect_bus(config.bus)
    store = CapabilityStore(config.database_path)
    engine = Engine(config, Discovery(config), prober, store, lifecycle=lifecycle)
    adaptor = BusAdaptor(bus, engine, config, lifecycle)
    outputs = build_outputs(config, engine, ready=f"serving {BUS_NAME}")
    lifecycle.watch(outputs.run_state_changed)
    engine_task: asyncio.Task[None] | None = None
    try:
        lifecycle.begin_learning()
        adaptor.start()
        engine_task = asyncio.create_task(
            engine.run(lambda: _begin_serving(bus, lifecycle, config)), name="engine"
        )
        await _until_over(bus, stop, engine_task, config)
    finally:
        served = lifecycle.serving
        lifecycle.begin_stopping()  # clients see RunState go from 'serving' to 'stopping'
        await outputs.close()  # before the name goes: a successor serves only after this
        if served:
            await release_name(bus)
        # Clients saw the name go: one InterfacesRemoved per device would flood the bus.
        adaptor.stop()
        if engine_task is not None:
            engine_task.cancel()
            await asyncio.gather(engine_task, return_exceptions=True)
        await close_bus(bus)
        lifecycle.end()


async def _begin_serving(bus: ResilientMessageBus, lifecycle: Lifecycle, config: Config) -> None:
    """The host is learned: take the name, then serve (announce, probe, answer).

    Raises:
        NameTakenError: another daemon owns the name; this one changes nothing on the host.
        BusError: the bus refused the request.
    """
    await own_name(bus)
    lifecycle.begin_serving()
    log.info("vfiocapsd %s serving %s on the %s", __version__, BUS_NAME, config.bus.describe())
    if config.emulated:
        log.warning("this host is emulated: the answers describe no real hardware")


async def _until_over(
    bus: ResilientMessageBus, stop: asyncio.Event, engine_task: asyncio.Task[None], config: Config
) -> None:
    """Wait for *stop*, the end of the bus connection or of the engine, whichever comes first.

    Raises:
        BusError: the connection was lost, or the name could not be taken.
        VfiocapsError: the engine failed or ended.
    """
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
    if "stop" in reasons:
        return
    if "engine" in reasons:
        error = None if engine_task.cancelled() else engine_task.exception()
        if isinstance(error, BusError):
            raise error
        raise VfiocapsError(f"the engine stopped: {error or 'it ended'}") from error
    raise BusError(f"lost the connection to the {config.bus.describe()}")
