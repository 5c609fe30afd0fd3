"""The daemon's start on this machine: from the process's start until it owns ``org.vfiocaps`` on
a private bus (cold: an empty cache, so the QEMU binary is asked for its version), beside the
floor ``name_floor.py`` (a Python process that imports dbus-fast and owns a name on that bus)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dbus_fast.aio import MessageBus

from bench.common import BENCH_FLOOR_NAME, REPO, Progress, cpu_seconds, summary
from bench.name_timing import seconds_to_name
from support.harness import BUS_NAME, PrivateBus
from support.prober import REAL_QEMU, ensure_probe_user

REPEATS = 10
HERE = Path(__file__).resolve().parent


def _environment() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO / "daemon"),
    }


def daemon_command(address: str, workdir: Path, qemu: str) -> list[str]:
    """vfiocapsd on the private bus with the host's /sys and /dev, its own empty directories."""
    return [
        sys.executable, "-m", "vfiocaps.daemon", "--bus-address", address,
        "--cache-dir", str(workdir / "cache"), "--runtime-dir", str(workdir / "run"),
        "--qemu", qemu,
    ]  # fmt: skip


def floor_command(address: str) -> list[str]:
    """The floor: the same interpreter, dbus-fast, one name on the same bus."""
    return [sys.executable, str(HERE / "name_floor.py"), address, BENCH_FLOOR_NAME]


async def _one(bus: MessageBus, name: str, command: list[str], log: Path) -> tuple[float, float]:
    """Seconds until *command* owns *name*, and the CPU seconds it had used by then (with the
    children it reaped: the daemon's ``qemu -version``)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        with log.open("ab") as out:
            processes.append(
                subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, env=_environment(), cwd="/"
                )
            )

    try:
        seconds = await seconds_to_name(bus, name, start)
        return seconds, cpu_seconds(processes[0].pid, children=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)


async def measure(repeats: int, progress: Progress) -> dict[str, Any]:
    """*repeats* cold starts of the daemon and of the floor, alternating."""
    if REAL_QEMU is None:
        raise RuntimeError("qemu-system-x86_64 is not installed")
    ensure_probe_user()
    scratch = Path(tempfile.mkdtemp(prefix="vfiocaps-bench-start-"))
    bus = PrivateBus(scratch / "bus").start()
    try:
        connection = await MessageBus(bus_address=bus.address).connect()
        daemon: list[tuple[float, float]] = []
        floor: list[tuple[float, float]] = []
        try:
            for round_ in range(repeats):
                progress.note(f"round {round_ + 1}/{repeats}")
                workdir = scratch / f"daemon-{round_}"
                workdir.mkdir()
                command = daemon_command(bus.address, workdir, REAL_QEMU)
                daemon.append(await _one(connection, BUS_NAME, command, scratch / "daemon.log"))
                command = floor_command(bus.address)
                floor.append(
                    await _one(connection, BENCH_FLOOR_NAME, command, scratch / "floor.log")
                )
        finally:
            connection.disconnect()
        return {
            "daemon": summary([wall for wall, _ in daemon]),
            "floor": summary([wall for wall, _ in floor]),
            "daemon_cpu": summary([cpu for _, cpu in daemon]),
            "floor_cpu": summary([cpu for _, cpu in floor]),
            "daemon_s": daemon,
            "floor_s": floor,
            "load": os.getloadavg()[0],
        }
    finally:
        bus.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def run(progress: Progress, repeats: int = REPEATS) -> dict[str, Any]:
    """The host's daemon start beside its floor."""
    return asyncio.run(measure(repeats, progress))
