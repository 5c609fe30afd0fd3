"""``vfiocapsctl``, the command-line client of the org.vfiocaps D-Bus API: its parser and main."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from ..bus.connection import close_bus, connect_bus
from ..client import ClientError, VfiocapsClient
from ..config import BusChoice
from ..domainxml import Viewer
from ..errors import (
    BusError,
    ConfigError,
    InvalidArgumentError,
    NotFoundError,
    UnsafeDirectoryError,
    VfiocapsError,
)
from .commands import daemon_command
from .exits import (
    ERROR_EXIT_CODES,
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_INCOMPATIBLE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_UNDECIDED,
    EXIT_USAGE,
)
from .probe import add_probe_parser, probe_command


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def _viewer_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--viewer",
        choices=[viewer.value for viewer in Viewer],
        default=Viewer.REMOTE.value,
        help="where the display is watched: remote (VNC, default) or local (SPICE with OpenGL "
        "for a dma-buf display)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``vfiocapsctl`` command line."""
    parser = argparse.ArgumentParser(
        prog="vfiocapsctl",
        description="Ask vfiocapsd what VFIO devices can do: display, GL, migration.",
        epilog=EXIT_CODES,
    )
    bus = parser.add_mutually_exclusive_group()
    bus.add_argument("--system", action="store_true", help="use the system bus (default)")
    bus.add_argument("--session", action="store_true", help="use the session bus")
    bus.add_argument("--bus-address", metavar="ADDR", help="use the bus at this D-Bus address")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS", help="per call (default 120)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _json_flag(commands.add_parser("status", help="the daemon's state"))
    _json_flag(commands.add_parser("list", help="every device and its capabilities"))
    show = commands.add_parser(
        "show",
        help="one device: its answer, the evidence, and its libvirt XML",
        description="Print what a device can do (display, OpenGL, migration), the evidence "
        "for it (QEMU version, driver, migration blockers and notes, the last error) and the "
        "libvirt XML a VM with it needs. --json gives every Device property and the XML parts.",
    )
    show.add_argument("id", metavar="ID", help="mdev UUID, PCI address or sysfs path")
    _viewer_option(show)
    _json_flag(show)
    _json_flag(
        commands.add_parser(
            "types", help="every mdev type, VF profile and PCI device type, and what is known"
        )
    )
    refresh = commands.add_parser("refresh", help="probe a device anew (needs authorization)")
    refresh.add_argument("id", metavar="ID")
    _json_flag(refresh)
    invalidate = commands.add_parser(
        "invalidate", help="drop a driver's cached records (needs authorization)"
    )
    invalidate.add_argument("driver", metavar="DRIVER", help="kernel module, e.g. nvidia")
    _json_flag(invalidate)
    xml = commands.add_parser(
        "xml",
        help="libvirt XML for a device: <hostdev>, <graphics>, <video>, <qemu:override>",
        description="Print the libvirt domain XML a device needs: its <hostdev>, the "
        "<graphics> and <video> elements its display needs, and the <qemu:override> it needs "
        "to migrate, each with a comment saying where it goes; --json gives the parts by name.",
    )
    xml.add_argument("id", metavar="ID")
    _viewer_option(xml)
    _json_flag(xml)
    _json_flag(commands.add_parser("monitor", help="print device and cache changes as they happen"))
    add_probe_parser(commands)
    _add_migration_parser(commands)
    return parser


def _add_migration_parser(commands: Any) -> None:
    migration = commands.add_parser("migration", help="migration compatibility between hosts")
    verbs = migration.add_subparsers(dest="verb", required=True, metavar="VERB")
    made = verbs.add_parser(
        "fingerprint", help="what must match on another host for this device's state to load"
    )
    made.add_argument("id", metavar="ID", help="mdev UUID, PCI address or sysfs path")
    _json_flag(made)
    check = verbs.add_parser(
        "check",
        help="can state saved on another host load here",
        description="Compare another host's fingerprint (from 'vfiocapsctl migration "
        "fingerprint ID --json' there) with a device here, field by field.",
        epilog=f"exit status: {EXIT_OK} compatible; {EXIT_INCOMPATIBLE} incompatible; "
        f"{EXIT_UNDECIDED} unknown; others as for vfiocapsctl",
    )
    check.add_argument("file", metavar="FILE", help="the fingerprint as JSON, or - for stdin")
    check.add_argument("--device", default="", metavar="ID", help="the destination device here "
                       "(default: every probed device of the fingerprint's type)")  # fmt: skip
    _json_flag(check)


async def _run(args: argparse.Namespace) -> int:
    if args.command == "probe":
        return await probe_command(args)
    bus = await connect_bus(BusChoice.from_options(args.bus_address, args.session))
    try:
        return await daemon_command(args, VfiocapsClient(bus, args.timeout))
    finally:
        await close_bus(bus)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vfiocapsctl``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "monitor" else EXIT_FAILURE
    except ClientError as err:
        print(f"vfiocapsctl: {err.message or err.name}", file=sys.stderr)
        return ERROR_EXIT_CODES.get(err.name, EXIT_FAILURE)
    except BusError as err:
        print(f"vfiocapsctl: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except NotFoundError as err:
        print(f"vfiocapsctl: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except UnsafeDirectoryError as err:
        print(f"vfiocapsctl: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except (ConfigError, InvalidArgumentError) as err:
        print(f"vfiocapsctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    except VfiocapsError as err:  # the probe's set-up: grant journal, no_new_privs
        print(f"vfiocapsctl: {err}", file=sys.stderr)
        return EXIT_FAILURE
