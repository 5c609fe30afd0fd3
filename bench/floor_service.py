"""The latency floor: a bare D-Bus method returning a constant a{sv}, same bus, same library.

Run as ``python floor_service.py BUS_ADDRESS REPLY_JSON``: it connects with vfiocapsd's own
:class:`~vfiocaps.bus.connection.ResilientMessageBus`, exports ``GetCapabilities(s) -> a{sv}``
(a coroutine, as vfiocapsd's is) and ``GetCapabilitiesSync`` (a plain function), both answering
with the constant read from REPLY_JSON (``[[key, signature, value], ...]``, taken from a real
vfiocapsd reply so that both messages have the same size), owns the bench name and serves until
SIGTERM.
"""

# dbus-fast reads the annotations at class creation: keep them real objects, not strings.
import asyncio
import json
import signal
import sys
from pathlib import Path

from dbus_fast import Variant
from dbus_fast.annotations import DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from vfiocaps.bus.connection import ResilientMessageBus
from vfiocaps.bus.values import DBusCapabilities

BENCH_FLOOR_NAME = "org.vfiocaps.BenchFloor"
BENCH_FLOOR_PATH = "/org/vfiocaps/BenchFloor"


class FloorInterface(ServiceInterface):
    """Answers every call with the same dictionary."""

    def __init__(self, reply: dict[str, Variant]) -> None:
        super().__init__(BENCH_FLOOR_NAME)
        self._reply = reply

    @dbus_method()
    async def GetCapabilities(self, id: DBusStr) -> DBusCapabilities:
        return self._reply

    @dbus_method()
    def GetCapabilitiesSync(self, id: DBusStr) -> DBusCapabilities:
        return self._reply


async def serve(address: str, reply: dict[str, Variant]) -> None:
    """Serve until SIGTERM or SIGINT."""
    bus = await ResilientMessageBus(bus_address=address).connect()
    bus.export(BENCH_FLOOR_PATH, FloorInterface(reply))
    await bus.request_name(BENCH_FLOOR_NAME)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    bus.disconnect()


if __name__ == "__main__":
    entries = json.loads(Path(sys.argv[2]).read_text())
    asyncio.run(serve(sys.argv[1], {key: Variant(sig, value) for key, sig, value in entries}))
