"""``vfiocapsctl probe``: probe one device in this process with a sandboxed QEMU, no daemon."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..capabilities import ProbeOutcome, ProbeReport
from ..capschema import dbus_values
from ..config import (
    DEFAULT_PROBE_USER,
    Config,
    default_qemu_binary,
    probe_environment_from,
)
from ..directories import ensure_private_directory
from ..errors import InvalidArgumentError, NotAuthorizedError, NotFoundError, UnsafeDirectoryError
from ..explain import capability_rows
from ..hardening import forbid_new_privileges
from ..hostpaths import DEV_ROOT, RUNTIME_DIR, SYSFS_ROOT
from ..ids import canonical_device_id, is_mdev_uuid
from ..prober import Prober, ProbeTarget
from .exits import EXIT_BUSY, EXIT_FAILURE, EXIT_OK, PROBE_EXIT_CODES


def positive_seconds(value: str) -> float:
    """A number of seconds above zero, from the command line."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {value!r}")
    return seconds


def _absolute(value: str) -> Path:
    path = Path(value)
    if not path.is_absolute():
        raise argparse.ArgumentTypeError(f"must be an absolute path: {value!r}")
    return path


def add_probe_parser(commands: Any) -> None:
    probe = commands.add_parser(
        "probe",
        help="probe one device now with a sandboxed QEMU, without the daemon",
        description="Probe one VFIO device (an mdev UUID, a PCI address, or its sysfs path) "
        "with a minimal sandboxed QEMU and print what it can do. Needs no daemon; run as root "
        "so that QEMU can run as the unprivileged probe user.",
        epilog=PROBE_EXIT_CODES,
    )
    probe.add_argument(
        "device", metavar="PATH_OR_UUID", help="mdev UUID, PCI address or sysfs path"
    )
    probe.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (default: text)"
    )
    probe.add_argument(
        "--sysfs-root", type=_absolute, default=SYSFS_ROOT, metavar="DIR", help="default: /sys"
    )
    probe.add_argument(
        "--dev-root", type=_absolute, default=DEV_ROOT, metavar="DIR", help="default: /dev"
    )
    probe.add_argument(
        "--runtime-dir",
        type=_absolute,
        metavar="DIR",
        help="where lent device nodes are recorded (default: /run/vfiocaps)",
    )
    probe.add_argument(
        "--qemu",
        type=_absolute,
        metavar="PATH",
        help="QEMU system emulator (default: qemu-system-ARCH on PATH)",
    )
    probe.add_argument(
        "--probe-user",
        default=DEFAULT_PROBE_USER,
        metavar="USER",
        help=f"unprivileged user that runs QEMU (default: {DEFAULT_PROBE_USER})",
    )
    probe.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="longest QEMU launch, above 0 (default 30)",
    )
    probe.add_argument(
        "--probe-env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="give QEMU this variable (NAME alone: from this environment); repeatable "
        "(default: only PATH and LC_ALL)",
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
    try:
        found = path.is_dir()
    except OSError as err:
        raise NotAuthorizedError(
            f"cannot look at {path} as uid {os.geteuid()}: {err.strerror}; run "
            "'vfiocapsctl probe' as root (sudo)"
        ) from err
    if not found:
        raise NotFoundError(f"no device {value} (looked at {path})")
    return path


def report_as_dict(device: Path, report: ProbeReport) -> dict[str, Any]:
    """A probe report as JSON values, named as the daemon's D-Bus API names them (capabilities
    as the Device properties of their names)."""
    caps = report.capabilities
    return {
        "Device": str(device),
        "Outcome": report.outcome.value,
        "Capabilities": None if caps is None else dbus_values(caps),
        "Error": report.error,
        "StderrExcerpt": report.stderr_excerpt,
        "Duration": round(report.duration, 6),
        "Launches": [
            {
                "Purpose": launch.purpose,
                "Argv": list(launch.argv),
                "Duration": round(launch.duration, 6),
                "ExitStatus": launch.exit_status,
            }
            for launch in report.launches
        ],
        "Notes": list(report.notes),
    }


def _print_report(values: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = [("device", values["Device"]), ("outcome", values["Outcome"])]
    caps = values["Capabilities"]
    if caps is not None:
        rows += capability_rows(caps)
    if values["Error"]:
        rows.append(("error", values["Error"]))
    for launch in values["Launches"]:
        status = launch["ExitStatus"]
        rows.append(("launch", f"{launch['Purpose']} {launch['Duration']:.3f} s (exit {status})"))
    rows += [("note", note) for note in values["Notes"]]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if values["StderrExcerpt"]:
        print("QEMU said:")
        print(values["StderrExcerpt"])


async def probe_command(args: argparse.Namespace) -> int:
    device = resolve_probe_device(args.device, args.sysfs_root)
    config = Config(
        sysfs_root=args.sysfs_root,
        dev_root=args.dev_root,
        runtime_dir=args.runtime_dir or RUNTIME_DIR,
        qemu_binary=args.qemu or default_qemu_binary(),
        probe_user=args.probe_user,
        probe_timeout=args.timeout,
        probe_environment=probe_environment_from(args.probe_env, os.environ),
    )
    try:
        ensure_private_directory(config.runtime_dir, "runtime")
    except UnsafeDirectoryError as err:
        if os.geteuid() == 0 or args.runtime_dir is not None:
            raise
        raise NotAuthorizedError(
            f"cannot use {config.runtime_dir} as uid {os.geteuid()}: run 'vfiocapsctl probe' as "
            "root (sudo), so that QEMU runs as the unprivileged probe user; or, to probe as "
            "yourself, name a directory of your own with --runtime-dir"
        ) from err
    target = ProbeTarget.from_sysfs(device, args.sysfs_root)
    forbid_new_privileges()
    prober = Prober(config)
    prober.recover_grants()
    report = await prober.probe(target)
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
