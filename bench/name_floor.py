"""The floor of the daemon's start: a Python process that imports the bus library vfiocapsd is
built on (dbus-fast), connects and owns a name, then serves until SIGTERM.

Run as ``python name_floor.py BUS NAME [MODULE_DIR]``; BUS is ``system`` or a D-Bus address.
MODULE_DIR, when given, goes first on ``sys.path`` the way the installed package's launcher puts
its private module directory there (run the interpreter with ``-I`` as the launcher does), so
that the floor imports the very dbus-fast the daemon imports. It imports only the standard
library and dbus-fast, so that its start is what any daemon on that library pays.
"""

import asyncio
import signal
import sys

USAGE = "usage: name_floor.py BUS NAME [MODULE_DIR]"


async def serve(bus_choice: str, name: str) -> int:
    """Own *name* on the bus until SIGTERM; 1 when the name cannot be had."""
    # Imported here, after main() has set up sys.path: the import is part of what is timed.
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus
    from dbus_fast.constants import RequestNameReply

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


def main(argv: list[str]) -> int:
    """Own NAME on BUS until SIGTERM (see the module's docstring)."""
    if len(argv) not in (2, 3):
        print(USAGE, file=sys.stderr)
        return 2
    if len(argv) == 3:
        sys.path.insert(0, argv[2])
    return asyncio.run(serve(argv[0], argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
