"""vGPU profiles set by other tools, at 512 VFs (8 GPUs x 64): the cost of one pass over the
profile files and the time from an external write to the device's appearance.

The pass is measured in process on the same tree (plain files, no umockdev), CPU time per pass
beside its floor: the same files opened, read and closed in a bare loop (the least any pass
must do). The appearance latency is measured on the real daemon under umockdev with its default
interval: a profile written by another tool (no uevent, as NVIDIA's driver) at a random moment
of the interval (an administrator's write does not know the pass) until the device is
published on the bus (``DeviceCount`` polled every 10 ms), beside its floor in the same run:
the same write followed at once by the ``change`` uevent a driver could send (the daemon's own
processing and publication).
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Progress, cpu_seconds, python_daemon_pid
from bench.profile_host import KEYS, ProfileBenchBuilder, ProfileBenchHost, vf_addresses
from support.daemon_lab import make_lab
from support.harness import BUS_NAME, ROOT_PATH, wait_until
from support.umockdev_hosts import DirectoryTestbed

PASSES = 50
LATENCY_ROUNDS = 8
PROFILE = "1060"
RELEASE = "6.12.0-bench"
INTERVAL = 5.0  # the daemon's default --profile-scan-seconds


def pass_cost(progress: Progress) -> dict[str, Any]:
    """CPU and wall time of one :class:`ProfileWatch` pass over 512 VFs, and of the floor."""
    from vfiocaps.discovery.identity import IdentityResolver, ModuleFiles
    from vfiocaps.discovery.profilewatch import ProfileWatch
    from vfiocaps.discovery.scan import HostReader
    from vfiocaps.discovery.state import HostState
    from vfiocaps.discovery.sysfs import SysfsTree

    with tempfile.TemporaryDirectory(prefix="vfiocaps-bench-profiles-") as directory:
        builder = ProfileBenchBuilder(DirectoryTestbed(Path(directory)), kernel_release=RELEASE)
        progress.note("building 8 GPUs x 64 VFs (fixture, not measured)")
        for key in KEYS:
            builder.build_sriov(key)
        sysfs = SysfsTree(builder.sys)
        reader = HostReader(
            sysfs, IdentityResolver(sysfs, ModuleFiles(builder.modules_root, RELEASE))
        )
        state = HostState(reader)
        state.resync(reader.host())
        snapshot = state.snapshot()
        watch = ProfileWatch(sysfs)
        watch.changed(snapshot)  # the first pass learns the lists
        files = [
            str((builder.sys / "bus/pci/devices" / vf / "nvidia").resolve() / name)
            for vf in sorted(snapshot.functions)
            for name in ("creatable_vgpu_types", "current_vgpu_type")
        ]
        progress.note(f"{PASSES} passes over {len(snapshot.functions)} VFs")
        ours_cpu, ours_wall, floor_cpu, floor_wall = [], [], [], []
        for _ in range(PASSES):
            cpu, wall = time.process_time(), time.perf_counter()
            changed = watch.changed(snapshot)
            ours_cpu.append(time.process_time() - cpu)
            ours_wall.append(time.perf_counter() - wall)
            assert changed == [], changed
            cpu, wall = time.process_time(), time.perf_counter()
            for path in files:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                os.read(fd, 4097)
                os.close(fd)
            floor_cpu.append(time.process_time() - cpu)
            floor_wall.append(time.perf_counter() - wall)
    return {
        "functions": len(snapshot.functions),
        "files_per_pass": len(files),
        "passes": PASSES,
        "cpu_s": statistics.median(ours_cpu),
        "wall_s": statistics.median(ours_wall),
        "floor_cpu_s": statistics.median(floor_cpu),
        "floor_wall_s": statistics.median(floor_wall),
    }


def _device_count(address: str) -> int:
    out = subprocess.run(
        ["busctl", f"--address={address}", "get-property", BUS_NAME, ROOT_PATH,
         "org.vfiocaps1.Manager", "DeviceCount"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return int(out.split()[1])


def _appearance(address: str, before: int, deadline: float) -> float:
    """Seconds until DeviceCount exceeds *before* (polled every 10 ms)."""
    began = time.monotonic()
    while _device_count(address) <= before:
        if time.monotonic() - began > deadline:
            raise TimeoutError("the device did not appear")
        time.sleep(0.01)
    return time.monotonic() - began


def appearance_latency(progress: Progress) -> dict[str, Any]:
    """External write to publication (default interval), beside write plus uevent."""
    lab_iter = make_lab(ProfileBenchHost)
    lab = next(lab_iter)
    try:
        host = lab.host
        assert isinstance(host, ProfileBenchHost)
        progress.note("building 8 GPUs x 64 VFs under umockdev (fixture, not measured)")
        for key in KEYS:
            host.build_sriov(key)
        daemon = lab.start()
        pid = python_daemon_pid(daemon.process.pid) if daemon.process else 0
        address = lab.bus.address
        wait_until(lambda: "event Resynchronised" in daemon.log(), 60, "the coldplug")
        vfs = vf_addresses()
        idle_began, idle_cpu = time.monotonic(), cpu_seconds(pid)
        time.sleep(20.0)
        idle = {"seconds": time.monotonic() - idle_began, "cpu_s": cpu_seconds(pid) - idle_cpu}
        ours, floor = [], []
        for round_number in range(LATENCY_ROUNDS):
            # A VF of another GPU each time: one write per card, as an administrator's.
            vf = vfs[(round_number * 64 + round_number) % len(vfs)]
            progress.note(f"round {round_number + 1}/{LATENCY_ROUNDS}: {vf}")
            for with_uevent, figures in ((False, ours), (True, floor)):
                time.sleep(random.uniform(0.0, INTERVAL))  # any phase of the pass
                before = _device_count(address)
                host.set_profile(vf, PROFILE)
                if with_uevent:
                    host.send_change(vf)
                figures.append(_appearance(address, before, 30.0))
                host.set_profile(vf, "0")
                wait_until(lambda b=before: _device_count(address) == b, 30, "the VF to go", 0.05)
        return {
            "rounds": LATENCY_ROUNDS,
            "interval_s": INTERVAL,
            "latency_s": ours,
            "floor_s": floor,
            "idle_window_s": idle["seconds"],
            "idle_cpu_s": idle["cpu_s"],
        }
    finally:
        lab_iter.close()


def run(progress: Progress) -> dict[str, Any]:
    """Both measurements."""
    return {"pass": pass_cost(progress), "latency": appearance_latency(progress)}
