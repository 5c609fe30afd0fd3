"""Lost uevents: a real netlink socket overflows (ENOBUFS) and discovery re-reads the host.

The overflow has to happen on a real ``NETLINK_KOBJECT_UEVENT`` socket (umockdev replaces it with
an ``AF_UNIX`` socket, which never reports ``ENOBUFS``). So the test runs itself, as a child, in a
network namespace of its own, where it plays udevd: as root it may send udev-format messages
(the ``libudev`` header and the properties) to netlink multicast group 2, which is what libudev
monitors with source ``udev`` listen to. A mount namespace with a private ``/run`` holds
``/run/udev/control``, which libudev checks before it agrees to listen to udev messages. The
child keeps the event loop busy while it sends more than the socket's small receive buffer holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

UDEV_GROUP = 2
NETLINK_KOBJECT_UEVENT = 15
UDEV_MONITOR_MAGIC = 0xFEEDCAFE
RELEASE = "6.12.0-test"


def libudev_message(properties: dict[str, str]) -> bytes:
    """A message as udevd sends it to libudev monitors: versioned header, then KEY=VALUE\\0..."""
    body = b"".join(f"{key}={value}".encode() + b"\0" for key, value in properties.items())
    header_size = 8 + 8 * 4
    header = (
        b"libudev\0"
        + struct.pack("!I", UDEV_MONITOR_MAGIC)
        + struct.pack("=III", header_size, header_size, len(body))
        + struct.pack("!IIII", 0, 0, 0, 0)
    )
    assert len(header) == header_size
    return header + body


def child(workdir: Path) -> None:
    """Runs in the private namespaces: build a host, overflow, report what discovery saw."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    Path("/run/udev").mkdir()
    Path("/run/udev/control").touch()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from support.umockdev_hosts import DirectoryTestbed, HostBuilder
    from vfiocaps.config import Config
    from vfiocaps.discovery import Discovery
    from vfiocaps.discovery.monitor import UdevMonitor
    from vfiocaps.model import DeviceAdded, DeviceRemoved, Resynchronised

    testbed = DirectoryTestbed(workdir / "bed")
    builder = HostBuilder(testbed, kernel_release=RELEASE, capacity={"mtty-1": 500})
    builder.build("mtty")
    config = Config(
        sysfs_root=builder.sys, modules_root=builder.modules_root, kernel_release=RELEASE
    )
    sender = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
    sender.bind((0, 0))

    def send(start: int) -> int:
        sent = 0
        for properties in testbed.uevents[start:]:
            sender.sendto(libudev_message(properties), (0, UDEV_GROUP))
            sent += 1
        return sent

    async def scenario() -> dict[str, object]:
        discovery = Discovery(config, monitor_factory=lambda: UdevMonitor(receive_buffer=4096))
        await discovery.start()
        batches: list[list[object]] = []

        async def collect() -> None:
            async for batch in discovery.events():
                batches.append(batch)

        collector = asyncio.create_task(collect())
        # One instance first, read normally.
        mark = len(testbed.uevents)
        first = builder.add_instance("mtty", "mtty-1")
        send(mark)
        await asyncio.sleep(0.5)
        # A burst while the loop is busy (nothing reads the socket): far more than 4 KiB.
        mark = len(testbed.uevents)
        burst = [builder.add_instance("mtty", "mtty-1") for _ in range(200)]
        builder.remove_instance(first)
        sent = send(mark)
        await asyncio.sleep(1.0)
        # After the overflow, events are read normally again.
        mark = len(testbed.uevents)
        builder.remove_instance(burst[0])
        send(mark)
        await asyncio.sleep(0.5)
        await discovery.close()
        await collector
        flat = [event for batch in batches for event in batch]
        return {
            "sent": sent,
            "resyncs": discovery.resyncs,
            "first": first,
            "burst": burst,
            "known": sorted(discovery.snapshot.devices),
            "events": [
                [type(e).__name__, getattr(getattr(e, "device", None), "device_id", None)]
                for e in flat
                if isinstance(e, DeviceAdded | DeviceRemoved | Resynchronised)
            ],
        }

    print(json.dumps(asyncio.run(scenario())), flush=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and netlink multicast")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_overflow_is_recovered_by_reading_the_host_again(tmp_path: Path) -> None:
    result = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "events were lost" in result.stderr
    assert report["resyncs"] == 1
    events = [tuple(e) for e in report["events"]]
    first, burst = report["first"], report["burst"]
    # The instance read normally (the coldplug is what start() returned, not an event).
    assert events[:1] == [("DeviceAdded", first)]
    # The overflow: whatever was read before it, then the difference, then Resynchronised.
    rest = events[1:]
    resync_at = rest.index(("Resynchronised", None))
    after_overflow = rest[resync_at + 1 :]
    assert after_overflow == [("DeviceRemoved", burst[0])]
    added = [d for kind, d in rest[:resync_at] if kind == "DeviceAdded"]
    removed = [d for kind, d in rest[:resync_at] if kind == "DeviceRemoved"]
    assert len(added) == len(set(added))  # nothing twice
    assert set(added) == set(burst)
    assert removed == [first]
    assert report["known"] == sorted(burst[1:])


if __name__ == "__main__":
    child(Path(sys.argv[1]))
