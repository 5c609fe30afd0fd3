"""The floors for queries: bare D-Bus answers of constants, same bus, same library.

Run as ``python floor_service.py BUS_ADDRESS REPLY_JSON [OBJECTS_MESSAGE]``: it connects with
vfiocapsd's own :class:`~vfiocaps.bus.connection.ResilientMessageBus`, exports
``GetCapabilities(s) -> a{sv}`` (a coroutine, as vfiocapsd's is) and ``GetCapabilitiesSync`` (a
plain function), both answering with the constant read from REPLY_JSON (``[[key, signature,
value], ...]``, taken from a real vfiocapsd reply so that both messages have the same size), owns
the bench name and serves until SIGTERM. With OBJECTS_MESSAGE (a marshalled
``GetManagedObjects`` reply of vfiocapsd's) it also answers ``GetManagedObjects`` on the bench
path with that reply's body, unmarshalled once at start: the same objects, interfaces and
property values, marshalled by the library for every call.
"""

# dbus-fast reads the annotations at class creation: keep them real objects, not strings.
import asyncio
import io
import json
import signal
import sys
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.annotations import DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from vfiocaps.bus.connection import ResilientMessageBus
from vfiocaps.bus.values import DBusCapabilities

BENCH_FLOOR_NAME = "org.vfiocaps.BenchFloor"
BENCH_FLOOR_PATH = "/org/vfiocaps/BenchFloor"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


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


def managed_objects(path: Path) -> tuple[str, list[Any]]:
    """The signature and body of the marshalled reply in *path*."""
    unmarshaller = Unmarshaller(io.BytesIO(path.read_bytes()))
    message = unmarshaller.unmarshall()
    if message is None:
        raise ValueError(f"{path} holds no complete D-Bus message")
    return message.signature, message.body


def objects_handler(signature: str, body: list[Any]) -> Any:
    """A message handler answering ``GetManagedObjects`` on the bench path with *body*."""

    def handle(msg: Message) -> Message | None:
        if (
            msg.message_type is MessageType.METHOD_CALL
            and msg.path == BENCH_FLOOR_PATH
            and msg.interface == OBJECT_MANAGER
            and msg.member == "GetManagedObjects"
        ):
            return Message.new_method_return(msg, signature, body)
        return None

    return handle


async def serve(
    address: str, reply: dict[str, Variant], objects: tuple[str, list[Any]] | None
) -> None:
    """Serve until SIGTERM or SIGINT."""
    bus = await ResilientMessageBus(bus_address=address).connect()
    bus.export(BENCH_FLOOR_PATH, FloorInterface(reply))
    if objects is not None:
        bus.add_message_handler(objects_handler(*objects))
    await bus.request_name(BENCH_FLOOR_NAME)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    bus.disconnect()


if __name__ == "__main__":
    entries = json.loads(Path(sys.argv[2]).read_text())
    objects = managed_objects(Path(sys.argv[3])) if len(sys.argv) > 3 else None
    reply = {key: Variant(sig, value) for key, sig, value in entries}
    asyncio.run(serve(sys.argv[1], reply, objects))
