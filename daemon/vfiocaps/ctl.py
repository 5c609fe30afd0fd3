"""``vfiocapsctl``: the command-line client of the org.vfiocaps D-Bus API."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .bus.connection import close_bus, connect_bus
from .bus.names import BUS_NAME, MANAGER_INTERFACE, ROOT_PATH
from .config import BusChoice, BusKind
from .errors import BusError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def _plain(value: Any) -> Any:
    """Unwrap dbus-fast variants into JSON-friendly values."""
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


async def _call(
    bus: MessageBus, path: str, interface: str, member: str, signature: str = "", body: Any = ()
) -> list[Any]:
    reply = await bus.call(
        Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
    )
    if reply is None:
        raise BusError(f"no reply to {interface}.{member}")
    if reply.message_type is MessageType.ERROR:
        detail = reply.body[0] if reply.body else ""
        raise BusError(f"{reply.error_name}: {detail}")
    return list(reply.body)


async def _status(bus: MessageBus, as_json: bool) -> int:
    (props,) = await _call(
        bus, ROOT_PATH, "org.freedesktop.DBus.Properties", "GetAll", "s", [MANAGER_INTERFACE]
    )
    values = _plain(props)
    if as_json:
        print(json.dumps(values, indent=2, sort_keys=True))
    else:
        width = max(map(len, values), default=0)
        for key in sorted(values):
            print(f"{key:<{width}}  {values[key]}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``vfiocapsctl`` command line."""
    parser = argparse.ArgumentParser(prog="vfiocapsctl", description="Query vfiocapsd.")
    bus = parser.add_mutually_exclusive_group()
    bus.add_argument("--system", action="store_true", help="use the system bus (default)")
    bus.add_argument("--session", action="store_true", help="use the session bus")
    bus.add_argument("--bus-address", metavar="ADDR", help="use the bus at this D-Bus address")
    parser.add_argument("--json", action="store_true", help="print JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="the daemon's state")
    return parser


async def _run(args: argparse.Namespace) -> int:
    if args.bus_address:
        choice = BusChoice(BusKind.ADDRESS, args.bus_address)
    elif args.session:
        choice = BusChoice(BusKind.SESSION)
    else:
        choice = BusChoice(BusKind.SYSTEM)
    bus = await connect_bus(choice)
    try:
        return await _status(bus, args.json)
    finally:
        await close_bus(bus)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vfiocapsctl``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except BusError as err:
        print(f"vfiocapsctl: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
