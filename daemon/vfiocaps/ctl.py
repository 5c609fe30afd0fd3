"""``vfiocapsctl``: the command-line client of the org.vfiocaps D-Bus API."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .bus.connection import close_bus, connect_bus
from .bus.names import BUS_NAME, MANAGER_INTERFACE, ROOT_PATH
from .capabilities import ProbeOutcome, ProbeReport
from .config import DEFAULT_PROBE_USER, BusChoice, BusKind, Config, default_qemu_binary
from .errors import BusError, ConfigError, InvalidArgumentError, NotFoundError
from .prober import Prober, ProbeTarget
from .prober.target import PCI_ADDRESS_RE, UUID_RE

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_BUSY = 4

PROBE_EXIT_CODES = (
    f"exit status: {EXIT_OK} the probe answered (outcome ok), {EXIT_FAILURE} it gave no answer "
    f"(failed, crashed, timeout, no-kvm, qemu-missing), {EXIT_USAGE} bad command line or no such "
    f"device, {EXIT_BUSY} the device is in use (a VM holds it; it was not disturbed)"
)


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
    _add_probe_parser(commands)
    return parser


def _absolute(value: str) -> Path:
    path = Path(value)
    if not path.is_absolute():
        raise argparse.ArgumentTypeError(f"must be an absolute path: {value!r}")
    return path


def _add_probe_parser(commands: Any) -> None:
    probe = commands.add_parser(
        "probe",
        help="probe one device now with a sandboxed QEMU, without the daemon",
        description="Probe one VFIO device (an mdev UUID, a PCI address, or its sysfs path) "
        "with a minimal sandboxed QEMU and print what it can do. Needs no daemon; run as root "
        "so that QEMU can run as the unprivileged probe user.",
        epilog=PROBE_EXIT_CODES,
    )
    probe.add_argument("device", metavar="PATH_OR_UUID")
    probe.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    probe.add_argument("--sysfs-root", type=_absolute, default=Path("/sys"), metavar="DIR")
    probe.add_argument("--dev-root", type=_absolute, default=Path("/dev"), metavar="DIR")
    probe.add_argument(
        "--runtime-dir", type=_absolute, metavar="DIR", help="default: /run/vfiocaps"
    )
    probe.add_argument("--qemu", type=_absolute, metavar="PATH", help="QEMU system emulator")
    probe.add_argument("--probe-user", default=DEFAULT_PROBE_USER, metavar="USER")
    probe.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")


def resolve_probe_device(value: str, sysfs_root: Path) -> Path:
    """The sysfs directory of *value*: an mdev UUID, a PCI address, or a path under *sysfs_root*.

    Raises :class:`NotFoundError` when there is no such device and :class:`InvalidArgumentError`
    when a path lies outside *sysfs_root*.
    """
    if UUID_RE.match(value):
        path = sysfs_root / "bus" / "mdev" / "devices" / value.lower()
    elif PCI_ADDRESS_RE.match(value):
        path = sysfs_root / "bus" / "pci" / "devices" / value.lower()
    else:
        path = Path(os.path.abspath(value))
        root = sysfs_root.resolve()
        if not path.resolve().is_relative_to(root):
            raise InvalidArgumentError(f"{value} is not under {sysfs_root}")
    if not path.is_dir():
        raise NotFoundError(f"no device {value} (looked at {path})")
    return path


def report_as_dict(device: Path, report: ProbeReport) -> dict[str, Any]:
    """A probe report as JSON-friendly values."""
    caps = report.capabilities
    return {
        "device": str(device),
        "outcome": report.outcome.value,
        "capabilities": None
        if caps is None
        else {
            "display": caps.display.value,
            "gl_required": caps.gl_required,
            "migration": caps.migration.value,
            "migration_blockers": list(caps.migration_blockers),
            "migration_notes": list(caps.migration_notes),
            "qemu_version": caps.qemu_version,
        },
        "error": report.error,
        "stderr_excerpt": report.stderr_excerpt,
        "duration": round(report.duration, 6),
        "launches": [
            {**asdict(launch), "argv": list(launch.argv), "duration": round(launch.duration, 6)}
            for launch in report.launches
        ],
        "notes": list(report.notes),
    }


def _print_report(values: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = [("device", values["device"]), ("outcome", values["outcome"])]
    caps = values["capabilities"]
    if caps is not None:
        rows += [
            ("display", caps["display"]),
            ("gl", "required" if caps["gl_required"] else "not required"),
            ("migration", caps["migration"]),
        ]
        rows += [("  blocker", blocker) for blocker in caps["migration_blockers"]]
        rows += [("  note", note) for note in caps["migration_notes"]]
        rows.append(("qemu", caps["qemu_version"]))
    if values["error"]:
        rows.append(("error", values["error"]))
    for launch in values["launches"]:
        status = launch["exit_status"]
        rows.append(("launch", f"{launch['purpose']} {launch['duration']:.3f} s (exit {status})"))
    rows += [("note", note) for note in values["notes"]]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if values["stderr_excerpt"]:
        print("QEMU said:")
        print(values["stderr_excerpt"])


async def _probe(args: argparse.Namespace) -> int:
    device = resolve_probe_device(args.device, args.sysfs_root)
    config = Config(
        sysfs_root=args.sysfs_root,
        dev_root=args.dev_root,
        runtime_dir=args.runtime_dir or Path("/run/vfiocaps"),
        qemu_binary=args.qemu or default_qemu_binary(),
        probe_user=args.probe_user,
        probe_timeout=args.timeout,
    )
    report = await Prober(config).probe(ProbeTarget.from_sysfs(device))
    values = report_as_dict(device, report)
    if getattr(args, "json", False):
        print(json.dumps(values, indent=2))
    else:
        _print_report(values)
    if report.outcome is ProbeOutcome.OK:
        return EXIT_OK
    if report.outcome is ProbeOutcome.BUSY:
        return EXIT_BUSY
    return EXIT_FAILURE


async def _run(args: argparse.Namespace) -> int:
    if args.command == "probe":
        return await _probe(args)
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
    except (ConfigError, InvalidArgumentError, NotFoundError) as err:
        print(f"vfiocapsctl: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
