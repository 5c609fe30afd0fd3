"""Scale: a daemon starting on a host with many devices of many types, its cache warm.

The host is :mod:`bench.scale_host` (50 types); the cache is warmed once by probing one instance
of every type, then the host is filled with instances (without uevents, timed apart from the
daemon) and a fresh daemon is started at each size: time to own the name, time until every
device is published, ``GetManagedObjects`` time and size, and the daemon's resident memory.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from typing import Any

from tests.support.daemon_lab import MANAGER, Lab, make_lab, manager_property
from tests.support.harness import BUS_NAME, ROOT_PATH, DaemonProcess, busctl, wait_until

from bench.common import Progress, memory_of, python_daemon_pid
from bench.scale_host import ScaleHost, type_ids

SIZES = (1000, 3000, 10000)
GET_MANAGED_OBJECTS_REPEATS = 3


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


async def _get_managed_objects(address: str) -> tuple[float, int, int, int]:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address).connect()
    began = time.perf_counter()
    reply = await bus.call(
        Message(
            destination="org.vfiocaps",
            path="/org/vfiocaps",
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
    return seconds, len(reply._marshall(False)), len(objects), done


def _device_count(lab: Lab) -> int:
    out = busctl(
        lab.bus.address, "--timeout=300", "get-property", "--json=short", BUS_NAME, ROOT_PATH,
        MANAGER, "DeviceCount", timeout=320,
    )  # fmt: skip
    return int(json.loads(out.stdout)["data"])


def measure_size(lab: Lab, size: int, plain: bool, progress: Progress) -> dict[str, Any]:
    """Start a daemon on the host as it is (*size* instances) and measure it."""
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
    progress.note(f"{size} devices: GetManagedObjects")
    calls = [
        asyncio.run(_get_managed_objects(lab.bus.address))
        for _ in range(GET_MANAGED_OBJECTS_REPEATS)
    ]
    after = memory_of(pid)
    busctl_seconds = []
    for _ in range(GET_MANAGED_OBJECTS_REPEATS):
        started = time.monotonic()
        subprocess.run(
            [
                "busctl",
                f"--address={lab.bus.address}",
                "call",
                "org.vfiocaps",
                "/org/vfiocaps",
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
            ],
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=300,
        )
        busctl_seconds.append(time.monotonic() - started)
    _, size_bytes, objects, done = calls[-1]
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
        "get_managed_objects_s": statistics.median(c[0] for c in calls),
        "get_managed_objects_busctl_s": statistics.median(busctl_seconds),
        "get_managed_objects_bytes": size_bytes,
        "objects": objects,
        "objects_done": done,
        "rss_kib_serving": before.rss_kib,
        "hwm_kib_serving": before.hwm_kib,
        "rss_kib_after_gmo": after.rss_kib,
        "hwm_kib_after_gmo": after.hwm_kib,
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
            for plain in (False, True):
                progress.note(f"{size} devices: starting vfiocapsd")
                results.append(measure_size(lab, size, plain, progress))
        return {"warm": warm, "fixture_seconds": fixture_seconds, "sizes": results}
    finally:
        if host is not None:
            host.stop()
        lab_iter.close()
