"""``vfiocapsd``: command line, start-up and shutdown of the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import __version__
from .app import serve
from .cmdline import EXIT_USAGE, Parser
from .config import (
    DEFAULT_PROBE_USER,
    BusChoice,
    Config,
    default_cache_dir,
    default_qemu_binary,
    default_runtime_dir,
    probe_environment_from,
)
from .directories import ensure_private_directory
from .errors import ConfigError, UnsafeDirectoryError, VfiocapsError
from .hardening import forbid_new_privileges
from .journal import setup_logging
from .memory import return_large_buffers
from .nfdlabels import DEFAULT_FEATURES_DIR

log = logging.getLogger("vfiocaps")

EXIT_OK = 0
EXIT_FAILURE = 1


def _absolute(value: str) -> Path:
    path = Path(value)
    if not path.is_absolute():
        raise argparse.ArgumentTypeError(f"must be an absolute path: {value!r}")
    return path


def build_parser() -> argparse.ArgumentParser:
    """The ``vfiocapsd`` command line."""
    parser = Parser(
        prog="vfiocapsd",
        description="Probe VFIO devices for display, GL and migration, cache the results, "
        "and serve them on D-Bus as org.vfiocaps.",
    )
    bus = parser.add_mutually_exclusive_group()
    bus.add_argument("--system", action="store_true", help="use the system bus (default)")
    bus.add_argument(
        "--session", action="store_true", help="use the session bus ($DBUS_SESSION_BUS_ADDRESS)"
    )
    bus.add_argument(
        "--bus-address", metavar="ADDR", help="use the bus at this D-Bus address (default: none)"
    )
    parser.add_argument(
        "--sysfs-root", type=_absolute, metavar="DIR", help="the sysfs tree read (default: /sys)"
    )
    parser.add_argument(
        "--dev-root", type=_absolute, metavar="DIR", help="device nodes (default: /dev)"
    )
    parser.add_argument(
        "--modules-root",
        type=_absolute,
        metavar="DIR",
        help="kernel modules, for drivers' identity (default: /lib/modules)",
    )
    parser.add_argument(
        "--cache-dir",
        type=_absolute,
        metavar="DIR",
        help="the capability cache (default: $CACHE_DIRECTORY; as a user $XDG_CACHE_HOME/vfiocaps "
        "or ~/.cache/vfiocaps; else /var/cache/vfiocaps)",
    )
    parser.add_argument(
        "--runtime-dir",
        type=_absolute,
        metavar="DIR",
        help="records of lent device nodes and temporary instances (default: "
        "$RUNTIME_DIRECTORY; as a user $XDG_RUNTIME_DIR/vfiocaps; else /run/vfiocaps)",
    )
    parser.add_argument(
        "--qemu",
        type=_absolute,
        metavar="PATH",
        help="QEMU system emulator (default: qemu-system-ARCH on PATH, else in /usr/bin)",
    )
    parser.add_argument(
        "--probe-user",
        metavar="USER",
        help=f"unprivileged user that runs QEMU (default: {DEFAULT_PROBE_USER})",
    )
    parser.add_argument(
        "--probe-timeout",
        type=float,
        metavar="SECONDS",
        help="longest QEMU launch of a probe, above 0 and at most 3600 (default 30)",
    )
    parser.add_argument(
        "--probe-concurrency",
        type=int,
        metavar="N",
        help="probes at once, 1 to 64 (default 2)",
    )
    parser.add_argument(
        "--probe-retry-seconds",
        type=float,
        metavar="SECONDS",
        help="first retry after a failed or busy probe (doubling up to an hour; default 30)",
    )
    parser.add_argument(
        "--profile-scan-seconds",
        type=float,
        metavar="SECONDS",
        help="how often vGPU profiles set by other tools are looked for (default 5)",
    )
    parser.add_argument(
        "--probe-types-without-instances",
        action="store_true",
        help="create a temporary instance to probe a type nobody has instantiated yet",
    )
    parser.add_argument(
        "--probe-settle-seconds",
        type=float,
        metavar="SECONDS",
        help="leave an instance created while the daemon runs alone this long before probing "
        "it: a VM may be starting on it (default 5; 0 probes at once)",
    )
    parser.add_argument(
        "--prefer-temporary-instances",
        action="store_true",
        help="answer an instance created while the daemon runs by probing a temporary instance "
        "of its type, where the type has room, and leave the user's instance alone",
    )
    parser.add_argument(
        "--migration-stream-limit",
        type=int,
        metavar="BYTES",
        help="largest migration stream a probe keeps to prove the load "
        "(default 268435456; a larger device state is reported as not proven)",
    )
    parser.add_argument(
        "--nfd-labels",
        nargs="?",
        type=_absolute,
        const=DEFAULT_FEATURES_DIR,
        metavar="DIR",
        help="publish each device type's answers as node-feature-discovery labels in a feature "
        f"file in DIR (default: {DEFAULT_FEATURES_DIR}); off unless given",
    )
    parser.add_argument(
        "--emulated",
        action="store_true",
        help="mark every answer as coming from an emulated host (for a demonstration)",
    )
    parser.add_argument(
        "--authorization-timeout",
        type=float,
        metavar="SECONDS",
        help="longest wait for polkit's answer to an interactive check (default 120; others "
        "wait at most 25)",
    )
    parser.add_argument(
        "--probe-env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="give the probe QEMU this variable (NAME alone: its value in vfiocapsd's "
        "environment); repeatable (default: only PATH and LC_ALL)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"vfiocapsd {__version__}")
    return parser


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Build the frozen configuration from parsed arguments and the environment.

    Raises:
        ConfigError: a value is out of range or inconsistent.
    """
    values: dict[str, object] = {
        "bus": BusChoice.from_options(args.bus_address, args.session),
        "cache_dir": args.cache_dir or default_cache_dir(environ),
        "runtime_dir": args.runtime_dir or default_runtime_dir(environ),
        "qemu_binary": args.qemu or default_qemu_binary(),
        "probe_types_without_instances": args.probe_types_without_instances,
        "prefer_temporary_instances": args.prefer_temporary_instances,
        "emulated": args.emulated,
        "probe_environment": probe_environment_from(args.probe_env, environ),
    }
    optional = {
        "sysfs_root": args.sysfs_root,
        "dev_root": args.dev_root,
        "modules_root": args.modules_root,
        "probe_user": args.probe_user,
        "probe_timeout": args.probe_timeout,
        "probe_concurrency": args.probe_concurrency,
        "probe_retry_seconds": args.probe_retry_seconds,
        "probe_settle_seconds": args.probe_settle_seconds,
        "profile_scan_seconds": args.profile_scan_seconds,
        "migration_stream_limit": args.migration_stream_limit,
        "nfd_features_dir": args.nfd_labels,
        "authorization_timeout": args.authorization_timeout,
    }
    values.update({key: value for key, value in optional.items() if value is not None})
    watchdog = environ.get("WATCHDOG_USEC", "")
    if watchdog.isdigit() and environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
        values["watchdog_usec"] = int(watchdog)
    return Config(**values)  # type: ignore[arg-type]


async def _main_async(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(config, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("vfiocapsd stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vfiocapsd``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as err:
        print(f"vfiocapsd: {err}", file=sys.stderr)
        return EXIT_USAGE
    return_large_buffers()
    try:
        ensure_private_directory(config.cache_dir, "cache")
        ensure_private_directory(config.runtime_dir, "runtime")
    except UnsafeDirectoryError as err:
        print(f"vfiocapsd: {err}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        forbid_new_privileges()
        asyncio.run(_main_async(config))
    except VfiocapsError as err:
        log.error("%s", err)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
