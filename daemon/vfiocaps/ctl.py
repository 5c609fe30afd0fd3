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

from .bus.connection import close_bus, connect_bus
from .capabilities import ProbeOutcome, ProbeReport
from .client import ClientError, Column, VfiocapsClient, as_json, key_values, table
from .config import (
    DEFAULT_PROBE_USER,
    BusChoice,
    BusKind,
    Config,
    default_qemu_binary,
    probe_environment_from,
)
from .directories import ensure_private_directory
from .domainxml import DomainParts, Viewer
from .errors import (
    BusError,
    ConfigError,
    InvalidArgumentError,
    NotFoundError,
    UnsafeDirectoryError,
    VfiocapsError,
)
from .explain import explain
from .fingerprint import MAX_DOCUMENT_BYTES
from .hardening import forbid_new_privileges
from .ids import canonical_device_id, is_mdev_uuid
from .prober import Prober, ProbeTarget

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_BUSY = 4
EXIT_NOT_FOUND = 5
EXIT_NOT_AUTHORIZED = 6
EXIT_INCOMPATIBLE = 7
EXIT_UNDECIDED = 8

EXIT_CODES = (
    f"exit status: {EXIT_OK} success; {EXIT_FAILURE} no answer (the probe failed, crashed or "
    f"timed out); {EXIT_USAGE} bad command line or malformed argument; {EXIT_UNAVAILABLE} "
    f"vfiocapsd is not reachable; {EXIT_BUSY} the device is in use by a VM (not disturbed); "
    f"{EXIT_NOT_FOUND} no such device; {EXIT_NOT_AUTHORIZED} not authorized; "
    f"{EXIT_INCOMPATIBLE} and {EXIT_UNDECIDED}: 'migration check' found the pair incompatible, "
    "or could not decide"
)
PROBE_EXIT_CODES = EXIT_CODES

# D-Bus error names of the daemon (and of the bus) to exit codes.
ERROR_EXIT_CODES = {
    "org.vfiocaps1.Error.NotFound": EXIT_NOT_FOUND,
    "org.vfiocaps1.Error.InvalidArgument": EXIT_USAGE,
    "org.vfiocaps1.Error.NotAuthorized": EXIT_NOT_AUTHORIZED,
    "org.vfiocaps1.Error.Busy": EXIT_BUSY,
    "org.vfiocaps1.Error.Timeout": EXIT_FAILURE,
    "org.vfiocaps1.Error.ProbeFailed": EXIT_FAILURE,
    "org.freedesktop.DBus.Error.ServiceUnknown": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.NameHasNoOwner": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.NoReply": EXIT_UNAVAILABLE,
    "timeout": EXIT_UNAVAILABLE,
}


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
    probe.add_argument(
        "--probe-env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="give QEMU this variable (NAME alone: from this environment); repeatable",
    )


def resolve_probe_device(value: str, sysfs_root: Path) -> Path:
    """The sysfs directory of *value*: an mdev UUID, a PCI address, or a path under *sysfs_root*.

    Raises :class:`NotFoundError` when there is no such device and :class:`InvalidArgumentError`
    when a path lies outside *sysfs_root*.
    """
    canonical = canonical_device_id(value)
    if canonical is not None:
        bus = "mdev" if is_mdev_uuid(canonical) else "pci"
        path = sysfs_root / "bus" / bus / "devices" / canonical
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
            "migration_options": [f"{k}={v}" for k, v in caps.migration_options],
            "migration_with_options": caps.migration_with_options.value,
            "migration_state_bytes": caps.migration_state_bytes,
            "migration_save_seconds": round(caps.migration_save_seconds, 6),
            "migration_load_seconds": round(caps.migration_load_seconds, 6),
            "migration_flags": list(caps.migration_flags),
            "migration_conditions": [
                f"{c.condition}: {c.verdict.value} ({c.decided_by.value}) {c.reason}"
                for c in caps.migration_conditions
            ],
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
        if caps["migration_options"]:
            options = ",".join(caps["migration_options"])
            rows.append(("  with options", f"{caps['migration_with_options']} ({options})"))
        if caps["migration_load_seconds"]:
            rows.append(
                (
                    "  round trip",
                    f"{caps['migration_state_bytes']} bytes, saved in "
                    f"{caps['migration_save_seconds']:.3f} s, loaded in "
                    f"{caps['migration_load_seconds']:.3f} s",
                )
            )
        if caps["migration_flags"]:
            rows.append(("  kernel flags", ", ".join(caps["migration_flags"])))
        rows += [("  condition", condition) for condition in caps["migration_conditions"]]
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
        probe_environment=probe_environment_from(args.probe_env, os.environ),
    )
    ensure_private_directory(config.runtime_dir, "runtime")
    forbid_new_privileges()
    prober = Prober(config)
    prober.recover_grants()
    report = await prober.probe(ProbeTarget.from_sysfs(device, args.sysfs_root))
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


DEVICE_COLUMNS = (
    Column("ID", "Id"),
    Column("TYPE", "TypeId"),
    Column("DRIVER", "Driver"),
    Column("STATE", "ProbeState"),
    Column("DISPLAY", "Display"),
    Column("GL", "GlRequired"),
    Column("MIGRATION", "Migration"),
)
TYPE_COLUMNS = (
    Column("KIND", "Kind"),
    Column("PARENT", "Parent"),
    Column("TYPE", "TypeId"),
    Column("NAME", "Name"),
    Column("DRIVER", "Driver"),
    Column("VERSION", "DriverVersion"),
    Column("INSTANCES", "Instances"),
    Column("AVAILABLE", "AvailableInstances"),
    Column("DISPLAY", "Display"),
    Column("GL", "GlRequired"),
    Column("MIGRATION", "Migration"),
)


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
    _add_probe_parser(commands)
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


def _read_fingerprint(name: str) -> str:
    """The fingerprint document named on the command line, read bounded."""
    try:
        if name == "-":
            text = sys.stdin.read(MAX_DOCUMENT_BYTES + 1)
        else:
            with open(name, encoding="utf-8") as file:
                text = file.read(MAX_DOCUMENT_BYTES + 1)
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgumentError(f"cannot read the fingerprint {name}: {err}") from err
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InvalidArgumentError(f"{name} is larger than a fingerprint ({MAX_DOCUMENT_BYTES} B)")
    return text


async def _migration(args: argparse.Namespace, client: VfiocapsClient, want_json: bool) -> int:
    if args.verb == "fingerprint":
        document = json.loads(await client.migration_fingerprint(args.id))
        print(as_json(document) if want_json else key_values(document))
        return EXIT_OK
    verdict, reasons = await client.check_migration(_read_fingerprint(args.file), args.device)
    if want_json:
        rows = [{"field": f, "verdict": v, "detail": d} for f, v, d in reasons]
        print(as_json({"verdict": verdict, "reasons": rows}))
    else:
        print(verdict)
        width = max((len(field) for field, _, _ in reasons), default=0)
        for field, judged, detail in reasons:
            print(f"  {field:<{width}}  {judged:<12}  {detail}")
    return {"compatible": EXIT_OK, "incompatible": EXIT_INCOMPATIBLE}.get(verdict, EXIT_UNDECIDED)


async def _daemon_command(args: argparse.Namespace, client: VfiocapsClient) -> int:
    want_json = bool(getattr(args, "json", False))
    command = args.command
    if command == "status":
        values = await client.manager_properties()
        print(as_json(values) if want_json else key_values(values))
    elif command == "list":
        devices = await client.devices()
        print(as_json(devices) if want_json else table(devices, DEVICE_COLUMNS))
        await _warn_if_emulated(client)
    elif command == "show":
        values = await client.device(args.id)
        parts, why = None, ""
        try:
            parts = await client.domain_xml_parts(args.id, args.viewer)
        except ClientError as err:
            why = err.message or err.name
        if want_json:
            print(as_json({**values, "DomainXmlParts": parts} if parts else values))
        else:
            emulated = bool((await client.manager_properties()).get("Emulated"))
            print(explain(values, parts, why, args.viewer, emulated), end="")
    elif command == "types":
        types = await client.types()
        print(as_json(types) if want_json else table(types, TYPE_COLUMNS))
        await _warn_if_emulated(client)
    elif command == "refresh":
        values = await client.refresh(args.id)
        print(as_json(values) if want_json else key_values(values))
    elif command == "invalidate":
        count = await client.invalidate(args.driver)
        print(as_json({"records": count}) if want_json else f"{count} records dropped")
    elif command == "xml":
        parts = await client.domain_xml_parts(args.id, args.viewer)
        xml = DomainParts.from_names(parts).fragment()
        print(
            as_json({"xml": xml, "parts": parts}) if want_json else xml,
            end="" if not want_json else "\n",
        )
    elif command == "migration":
        return await _migration(args, client, want_json)
    elif command == "monitor":
        async for event in client.changes():
            if want_json:
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(_describe_event(event), flush=True)
    return EXIT_OK


async def _warn_if_emulated(client: VfiocapsClient) -> None:
    if (await client.manager_properties()).get("Emulated"):
        print(
            "vfiocapsctl: an emulated host: these answers describe no real hardware",
            file=sys.stderr,
        )


def _describe_event(event: dict[str, Any]) -> str:
    kind = event["event"]
    details = " ".join(
        f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in sorted(event.items())
        if key not in ("event", "path")
    )
    target = event.get("path", "")
    return f"{kind} {target} {details}".replace("  ", " ").strip()


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
        return await _daemon_command(args, VfiocapsClient(bus, args.timeout))
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


if __name__ == "__main__":
    sys.exit(main())
