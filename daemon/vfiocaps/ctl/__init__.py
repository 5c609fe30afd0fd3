"""``vfiocapsctl``, the command-line client of the org.vfiocaps D-Bus API: its parser and main."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..bus.connection import close_bus, connect_bus
from ..client import ClientError, VfiocapsClient
from ..cmdline import EXIT_USAGE, Parser
from ..config import BusChoice
from ..domainxml import Viewer
from ..errors import VfiocapsError
from .agent import tty_agent
from .commands import daemon_command
from .exits import (
    ERROR_EXIT_CODES,
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_INCOMPATIBLE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNDECIDED,
    exit_status_of,
)
from .probe import add_probe_parser, positive_seconds, probe_command


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (default: text)"
    )


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
    parser = Parser(
        prog="vfiocapsctl",
        description="Ask vfiocapsd what VFIO devices can do: display, GL, migration.",
        epilog=EXIT_CODES,
    )
    bus = parser.add_mutually_exclusive_group()
    bus.add_argument("--system", action="store_true", help="use the system bus (default)")
    bus.add_argument(
        "--session", action="store_true", help="use the session bus ($DBUS_SESSION_BUS_ADDRESS)"
    )
    bus.add_argument(
        "--bus-address",
        metavar="ADDR",
        help="use the bus at this D-Bus address, e.g. unix:path=/run/vfiocaps-quickstart/bus "
        "as ./scripts/run-daemon prints it (default: the system bus)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (default: text)")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=120.0,
        metavar="SECONDS",
        help="longest wait for each call, above 0 (default 120)",
    )
    parser.add_argument(
        "--no-ask-password",
        action="store_true",
        help="never let polkit ask for a password (default: ask when run from a terminal)",
    )
    parser.add_argument("--version", action="version", version=f"vfiocapsctl {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
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
            "types",
            help="every mdev type, VF profile and PCI device type, and what is known",
            description="List every mdev type (KIND mdev), SR-IOV vGPU profile (vf-profile) "
            "and VFIO PCI device type (pci) with its instances, what is available and the "
            "answer when probed. Long names are shortened to fit 100 columns; --json gives "
            "every value in full, driver versions included.",
        )
    )
    refresh = commands.add_parser("refresh", help="probe a device anew (needs authorization)")
    refresh.add_argument("id", metavar="ID", help="mdev UUID, PCI address or sysfs path")
    _json_flag(refresh)
    probe_type = commands.add_parser(
        "probe-type",
        help="probe a type before any VM uses it (needs authorization)",
        description="Learn an mdev type's or a VF profile's capabilities through a temporary "
        "instance (or a profile set on a free VF), removed again afterwards; a type already "
        "known is answered from the cache. PARENT and TYPE as 'vfiocapsctl types' lists them.",
    )
    probe_type.add_argument("parent", metavar="PARENT", help="the parent, as in 'types'")
    probe_type.add_argument("type_id", metavar="TYPE", help="the type id, as in 'types'")
    _json_flag(probe_type)
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
    xml.add_argument("id", metavar="ID", help="mdev UUID, PCI address or sysfs path")
    _viewer_option(xml)
    _json_flag(xml)
    _json_flag(commands.add_parser("monitor", help="print device and cache changes as they happen"))
    add_probe_parser(commands)
    _add_migration_parser(commands)
    return parser


def _add_migration_parser(commands: Any) -> None:
    migration = commands.add_parser("migration", help="migration compatibility between hosts")
    verbs = migration.add_subparsers(
        dest="verb", required=True, metavar="VERB", parser_class=Parser
    )
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


# The commands whose calls change state: polkit may ask the user to authenticate for them.
ASKING_COMMANDS = frozenset({"refresh", "invalidate", "probe-type"})


async def _run(args: argparse.Namespace) -> int:
    if args.command == "probe":
        return await probe_command(args)
    bus = await connect_bus(BusChoice.from_options(args.bus_address, args.session))
    ask = not args.no_ask_password and sys.stdin.isatty()
    try:
        async with tty_agent(ask and args.command in ASKING_COMMANDS):
            return await daemon_command(args, VfiocapsClient(bus, args.timeout, ask_password=ask))
    finally:
        await close_bus(bus)


def _not_utf8(args: argparse.Namespace) -> str | None:
    """The first argument that is not valid UTF-8 (D-Bus strings must be), if any."""
    for value in vars(args).values():
        for item in value if isinstance(value, list) else [value]:
            text = os.fspath(item) if isinstance(item, os.PathLike) else item
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None


def _say(text: str) -> None:
    print(f"vfiocapsctl: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vfiocapsctl``; returns the process exit status."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    bad = _not_utf8(args)
    if bad is not None:
        _say(f"not valid UTF-8: {bad!r}; give device ids, paths and names as UTF-8 text")
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ClientError as err:
        _say(describe_client_error(err))
        return ERROR_EXIT_CODES.get(err.name, EXIT_FAILURE)
    except VfiocapsError as err:
        _say(str(err))
        return exit_status_of(err)


def describe_client_error(err: ClientError) -> str:
    """One line for an error the daemon (or the bus) answered, saying what to do."""
    if err.message:
        return err.message
    if err.name in ("org.vfiocaps1.Error.NotAuthorized", "org.freedesktop.DBus.Error.AccessDenied"):
        return (
            f"not authorized ({err.name}): changing state needs root, or polkit's yes for "
            "org.vfiocaps.refresh, .invalidate or .probe-type; run it with sudo, or from a "
            "terminal without --no-ask-password so that polkit can ask for a password"
        )
    return f"the daemon answered {err.name} without a message; see its log"
