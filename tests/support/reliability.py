"""Shared parts of the reliability tests: processes, leftovers and bus reads of a running lab."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from .daemon_lab import Lab
from .harness import BUS_NAME, ROOT_PATH, DaemonProcess, busctl

DEVICE = "org.vfiocaps1.Device"


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dictionary (empty when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def cmdline(pid: int) -> list[str]:
    """The argv a process was started with (empty when gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid: int) -> list[int]:
    """Direct children of *pid* (zombies included)."""
    found = []
    for other in all_pids():
        if proc_status(other).get("PPid") == str(pid):
            found.append(other)
    return found


def daemon_pid(daemon: DaemonProcess) -> int:
    """The pid of the Python process under the wrappers (unshare, sh, umockdev-wrapper)."""
    assert daemon.process is not None
    pid = daemon.process.pid
    for _ in range(6):
        if any("vfiocaps.daemon" in arg for arg in cmdline(pid)) and "python" in " ".join(
            cmdline(pid)[:1]
        ):
            return pid
        below = children(pid)
        if not below:
            break
        pid = below[0]
    raise AssertionError(f"no vfiocapsd process below {daemon.process.pid}")


# The daemon's questions about the binary itself (its version, vfio-pci's properties): short QEMU
# starts that are no probe.
IDENTITY_ARGUMENTS = {"-version", "vfio-pci,help"}


def qemu_pids(lab: Lab, naming: str = "") -> list[int]:
    """Live probe processes of this lab's QEMU binary (not the daemon's questions about the
    binary); with *naming*, only those with an argument that contains it (a device's UUID)."""
    return [
        pid
        for pid in all_pids()
        if str(lab.qemu) in (line := cmdline(pid))[:2]
        and not IDENTITY_ARGUMENTS.intersection(line)
        and (not naming or any(naming in argument for argument in line))
    ]


def zombie_children(pid: int) -> list[int]:
    return [child for child in children(pid) if proc_status(child).get("State", "").startswith("Z")]


def probe_leftovers(daemon: DaemonProcess) -> list[Path]:
    """Files a finished probe must not leave: private directories and granted-node records."""
    run = daemon.runtime_dir
    if not run.exists():
        return []
    left = sorted(run.glob("probe-*"))
    grants = run / "grants"
    if grants.exists():
        left += sorted(grants.iterdir())
    return left


def device_path(bus_address: str, device_id: str) -> str:
    """The device's object path, as Manager.GetDevice gives it."""
    out = busctl(
        bus_address, "call", "--json=short", BUS_NAME, ROOT_PATH, "org.vfiocaps1.Manager",
        "GetDevice", "s", device_id,
    )  # fmt: skip
    return str(json.loads(out.stdout)["data"][0])


def device_properties(lab: Lab, object_path: str) -> dict[str, Any]:
    out = busctl(
        lab.bus.address, "call", "--json=short", BUS_NAME, object_path,
        "org.freedesktop.DBus.Properties", "GetAll", "s", DEVICE,
    )  # fmt: skip
    return {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}


def history(database: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT driver, type_id, outcome FROM probe_history ORDER BY id"
        ).fetchall()


def records(database: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT driver, type_id, outcome FROM capabilities ORDER BY type_id"
        ).fetchall()
