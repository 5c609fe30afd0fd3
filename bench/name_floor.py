"""The floor of the daemon's start: a Python process that imports the bus library vfiocapsd is
built on (dbus-fast), connects and owns a name, then serves until SIGTERM.

Run as ``python name_floor.py BUS NAME``; BUS is ``system`` or a D-Bus address. It imports only
the standard library and dbus-fast, so that its start is what any daemon on that library pays.
"""

import asyncio
import signal
import sys

from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from dbus_fast.constants import RequestNameReply


async def serve(bus_choice: str, name: str) -> int:
    """Own *name* on the bus until SIGTERM; 1 when the name cannot be had."""
    if bus_choice == "system":
        bus = MessageBus(bus_type=BusType.SYSTEM)
    else:
        bus = MessageBus(bus_address=bus_choice)
    await bus.connect()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    reply = await bus.request_name(name)
    if reply != RequestNameReply.PRIMARY_OWNER:
        print(f"name_floor: {name} not owned: {reply}", file=sys.stderr)
        return 1
    await stop.wait()
    bus.disconnect()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: name_floor.py BUS NAME")
    sys.exit(asyncio.run(serve(sys.argv[1], sys.argv[2])))
