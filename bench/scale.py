"""Scale: a daemon starting on a host with many devices of many types, its cache warm.

The host is :mod:`bench.scale_host` (50 types); the cache is warmed once by probing one instance
of every type, then the host is filled with instances (without uevents, timed apart from the
daemon) and a fresh daemon is started at each size: time to own the name, time until every
device is published, ``GetManagedObjects`` time and size beside its floor (``floor_service.py``
answering with the same reply's body, unmarshalled once), and the daemon's resident memory. The
daemon under umockdev then takes a burst of hotplugs (instances of a cached type, their
uevents back to back) and its peak resident memory (VmHWM) is read after all three.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_FLOOR_NAME,
    BENCH_FLOOR_PATH,
    Progress,
    memory_of,
    python_daemon_pid,
)
from bench.scale_host import ScaleHost, type_ids
from support.daemon_lab import MANAGER, Lab, make_lab, manager_property
from support.harness import BUS_NAME, ROOT_PATH, DaemonProcess, busctl, wait_until

SIZES = (1000, 3000, 10000)
GET_MANAGED_OBJECTS_REPEATS = 5
HOTPLUG_BURST = 1000
HERE = Path(__file__).resolve().parent


def _use_scale_host(lab: Lab) -> ScaleHost:
    lab.host.stop()
    host = ScaleHost().start()
    host.root.chmod(0o755)
    lab.host = host
    behaviours = lab.qemu.parent / "behaviours.json"
    data = json.loads(behaviours.read_text())
    data["select"].insert(0, {"type_prefix": "vbench", "profile": "mdpy"})
    behaviours.write_text(json.dumps(data))
    return host


def _daemon(lab: Lab, name: str, plain: bool = False) -> DaemonProcess:
    """A daemon on the scale host: under umockdev, or (*plain*) reading the same tree directly
    with ``--sysfs-root`` and no preload, so that umockdev's path translation is not counted."""
    if plain:
        return DaemonProcess(
            bus=lab.bus,
            workdir=lab.directory / name,
            args=lab.daemon_args("--sysfs-root", str(lab.host.root / "sys")),
        )
    return lab.daemon(name=name)


def warm_cache(lab: Lab, host: ScaleHost, progress: Progress) -> dict[str, Any]:
    """Probe one instance of every type so that the cache holds all of them."""
    daemon = _daemon(lab, "warm").start()
    lab.daemons.append(daemon)
    wait_until(lambda: "event Resynchronised" in daemon.log(), 30, "the coldplug")
    began = time.monotonic()
    uuids = []
    for module, type_id in type_ids():
        uuids += host.storm(module, type_id, 1)["uuids"]
    progress.note(f"warming the cache: probing {len(uuids)} types")
    lab.wait_states(dict.fromkeys(uuids, "done"), timeout=180)
    probes = manager_property(lab.bus, "ProbeCount")
    daemon.stop()
    return {"types": len(uuids), "probes": probes, "seconds": time.monotonic() - began}


async def _get_managed_objects(
    address: str, destination: str = BUS_NAME, path: str = ROOT_PATH
) -> tuple[float, bytes, int, int]:
    """One ``GetManagedObjects`` with a dbus-fast client: seconds, the marshalled reply, the
    number of objects and how many of them are probed."""
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address).connect()
    began = time.perf_counter()
    reply = await bus.call(
        Message(
            destination=destination,
            path=path,
            interface="org.freedesktop.DBus.ObjectManager",
            member="GetManagedObjects",
        )
    )
    seconds = time.perf_counter() - began
    bus.disconnect()
    if reply is None or reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"GetManagedObjects failed: {reply.body if reply else 'no reply'}")
    objects = reply.body[0]
    done = sum(
        1
        for interfaces in objects.values()
        if (props := interfaces.get("org.vfiocaps1.Device")) and props["ProbeState"].value == "done"
    )
    return seconds, bytes(reply._marshall(False)), len(objects), done


def _busctl_get_managed_objects(address: str, destination: str, path: str) -> float:
    """Seconds for ``busctl call ... GetManagedObjects`` (its text output discarded)."""
    started = time.monotonic()
    subprocess.run(
        [
            "busctl", f"--address={address}", "call", destination, path,
            "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
        ],
        stdout=subprocess.DEVNULL, check=True, timeout=300,
    )  # fmt: skip
    return time.monotonic() - started


def _start_floor(lab: Lab, reply: bytes, name: str) -> subprocess.Popen[bytes]:
    """``floor_service.py`` answering ``GetManagedObjects`` with *reply*'s body."""
    message = lab.directory / f"{name}-objects.bin"
    message.write_bytes(reply)
    constant = lab.directory / f"{name}-constant.json"
    constant.write_text("[]")
    floor = subprocess.Popen(
        [sys.executable, str(HERE / "floor_service.py"), lab.bus.address, str(constant),
         str(message)],
    )  # fmt: skip
    wait_until(lambda: lab.bus.name_has_owner(BENCH_FLOOR_NAME), 60, "the floor service")
    return floor


def compare_get_managed_objects(lab: Lab, name: str) -> dict[str, Any]:
    """``GetManagedObjects`` of the daemon against the floor, alternating, with a dbus-fast
    client and with busctl; the floor answers with the body of the daemon's first reply."""
    address = lab.bus.address
    _, reply, objects, done = asyncio.run(_get_managed_objects(address))
    floor = _start_floor(lab, reply, name)
    try:
        ours: list[float] = []
        bare: list[float] = []
        ours_busctl: list[float] = []
        bare_busctl: list[float] = []
        for _ in range(GET_MANAGED_OBJECTS_REPEATS):
            ours.append(asyncio.run(_get_managed_objects(address))[0])
            seconds, floor_reply, floor_objects, _ = asyncio.run(
                _get_managed_objects(address, BENCH_FLOOR_NAME, BENCH_FLOOR_PATH)
            )
            bare.append(seconds)
            if floor_objects != objects or abs(len(floor_reply) - len(reply)) > 64:
                raise RuntimeError("the floor's GetManagedObjects is not the daemon's")
            ours_busctl.append(_busctl_get_managed_objects(address, BUS_NAME, ROOT_PATH))
            bare_busctl.append(
                _busctl_get_managed_objects(address, BENCH_FLOOR_NAME, BENCH_FLOOR_PATH)
            )
    finally:
        floor.terminate()
        floor.wait(10)
    return {
        "get_managed_objects_s": statistics.median(ours),
        "get_managed_objects_floor_s": statistics.median(bare),
        "get_managed_objects_busctl_s": statistics.median(ours_busctl),
        "get_managed_objects_busctl_floor_s": statistics.median(bare_busctl),
        "get_managed_objects_bytes": len(reply),
        "objects": objects,
        "objects_done": done,
    }


def hotplug_burst(lab: Lab, host: ScaleHost, size: int, progress: Progress) -> float:
    """Add HOTPLUG_BURST instances of one cached type, their uevents back to back; return the
    seconds from the first uevent until the daemon publishes all of them."""
    progress.note(f"{size} devices: a burst of {HOTPLUG_BURST} hotplugs")
    module, type_id = type_ids()[0]
    burst = host.storm(module, type_id, HOTPLUG_BURST)
    wanted = size + HOTPLUG_BURST
    wait_until(lambda: _device_count(lab) == wanted, 300, f"{wanted} devices", interval=0.1)
    return time.time() - float(burst["began"])


def _device_count(lab: Lab) -> int:
    out = busctl(
        lab.bus.address, "--timeout=300", "get-property", "--json=short", BUS_NAME, ROOT_PATH,
        MANAGER, "DeviceCount", timeout=320,
    )  # fmt: skip
    return int(json.loads(out.stdout)["data"])


def measure_size(
    lab: Lab, size: int, plain: bool, progress: Progress, host: ScaleHost | None = None
) -> dict[str, Any]:
    """Start a daemon on the host as it is (*size* instances) and measure it; with *host*,
    end with a burst of hotplugs on it (which leaves the host larger by the burst)."""
    daemon = _daemon(lab, f"scale-{size}-{'plain' if plain else 'umockdev'}", plain)
    lab.daemons.append(daemon)
    # One watcher that sleeps until the name appears: polling with a client process every few
    # milliseconds would take CPU from the daemon being measured.
    watcher = subprocess.Popen(
        ["gdbus", "wait", "--address", lab.bus.address, "--timeout", "120", BUS_NAME],
        stdout=subprocess.DEVNULL,
    )
    began = time.monotonic()
    daemon.start(wait=False)
    assert daemon.process is not None
    if watcher.wait(timeout=130) != 0:
        raise RuntimeError(f"{BUS_NAME} did not appear within 120 s")
    named = time.monotonic() - began
    progress.note(f"{size} devices: waiting for all to be published")
    first_answer: float | None = None
    longest_wait = 0.0
    deadline = began + 600
    while True:
        asked = time.monotonic()
        count = _device_count(lab)  # waits while the daemon's event loop is busy
        longest_wait = max(longest_wait, time.monotonic() - asked)
        if first_answer is None:
            first_answer = time.monotonic() - began
        if count == size:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count} of {size} devices were published")
        time.sleep(0.02)
    serving = time.monotonic() - began
    pid = python_daemon_pid(daemon.process.pid) if not plain else daemon.process.pid
    before = memory_of(pid)
    progress.note(f"{size} devices: GetManagedObjects, vfiocapsd and the floor")
    calls = compare_get_managed_objects(lab, f"scale-{size}")
    after = memory_of(pid)
    burst: dict[str, Any] = {}
    if host is not None:
        seconds = hotplug_burst(lab, host, size, progress)
        burst = {
            "hotplug_burst": HOTPLUG_BURST,
            "hotplug_burst_s": seconds,
            "hwm_kib_after_burst": memory_of(pid).hwm_kib,
            "rss_kib_after_burst": memory_of(pid).rss_kib,
        }
    daemon.stop()
    if "probed " in daemon.log():
        raise RuntimeError(f"the daemon at {size} devices probed: the cache was not warm")
    return {
        "devices": size,
        "sysfs": "plain directory" if plain else "umockdev",
        "name_owned_s": named,
        "first_answer_s": first_answer,
        "longest_unanswered_s": longest_wait,
        "all_published_s": serving,
        **calls,
        "rss_kib_serving": before.rss_kib,
        "hwm_kib_serving": before.hwm_kib,
        "rss_kib_after_gmo": after.rss_kib,
        "hwm_kib_after_gmo": after.hwm_kib,
        **burst,
    }


def run(progress: Progress, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """Warm the cache for 50 types, then measure a fresh daemon at each size."""
    lab_iter = make_lab()
    lab = next(lab_iter)
    host: ScaleHost | None = None
    try:
        host = _use_scale_host(lab)
        host.build("scale")
        warm = warm_cache(lab, host, progress)
        results = []
        fixture_seconds = 0.0
        for size in sizes:
            progress.note(f"creating instances up to {size} (fixture, not measured)")
            missing = size - len(host.call("instance_count"))
            if missing > 0:
                fixture_seconds += host.populate(missing)["seconds"]
            # The plain directory first: the burst (under umockdev, which sends the uevents,
            # at the largest size) leaves more instances on the host.
            progress.note(f"{size} devices: starting vfiocapsd")
            results.append(measure_size(lab, size, True, progress))
            progress.note(f"{size} devices: starting vfiocapsd under umockdev")
            last = size == sizes[-1]
            results.append(measure_size(lab, size, False, progress, host if last else None))
        return {"warm": warm, "fixture_seconds": fixture_seconds, "sizes": results}
    finally:
        if host is not None:
            host.stop()
        lab_iter.close()
