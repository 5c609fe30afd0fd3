"""Hostile sysfs content through the real daemon: a huge attribute, invalid UTF-8, a symlink
loop, links and device entries escaping the sysfs root.

The daemon must keep serving the sound devices, answer with named errors only, and read no file
outside the sysfs root: the escaping links lead to canary files whose access times would move.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from support.daemon_lab import Lab, capabilities, manager_property
from support.harness import BUS_NAME, ROOT_PATH, busctl, gdbus

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

MANAGER = "org.vfiocaps1.Manager"
LOOP = "0f0f0f0f-0000-4000-8000-0000000100b0"
OUTSIDE_TYPE = "0f0f0f0f-0000-4000-8000-0000000e5ca1"
OUTSIDE_GROUP = "0f0f0f0f-0000-4000-8000-0000000e5ca2"
OUTSIDE_DEVICE = "0f0f0f0f-0000-4000-8000-0000000e5ca3"
DAY = 24 * 3600


def make_canary(directory: Path) -> list[Path]:
    """A fake mdev type and device outside sysfs, every file's access time two days old."""
    files = {
        "type/name": "canary\n",
        "type/device_api": "vfio-pci\n",
        "type/available_instances": "1\n",
        "type/description": "canary\n",
        "device/uevent": "DRIVER=vfio_mdev\n",
        "group/name": "canary\n",
    }
    written = []
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    os.symlink(directory / "type", directory / "device" / "mdev_type")
    now = time.time()
    for path in written:
        os.utime(path, (now - 2 * DAY, now - 3 * DAY))
    return written


def atimes(paths: list[Path]) -> dict[Path, int]:
    return {path: path.stat().st_atime_ns for path in paths}


def relink(link: Path, target: str | Path) -> None:
    link.unlink()
    os.symlink(target, link)


def named_error(lab: Lab, member: str, value: str) -> str:
    out = gdbus(
        lab.bus.address, "call", "--dest", BUS_NAME, "--object-path", ROOT_PATH,
        "--method", f"{MANAGER}.{member}", "--", value, check=False,
    )  # fmt: skip
    if out.returncode == 0:
        return "ok"
    assert "org.freedesktop.DBus.Error.Failed" not in out.stderr, out.stderr
    assert "GDBus.Error:org.vfiocaps1.Error." in out.stderr, out.stderr
    return out.stderr.split("GDBus.Error:", 1)[1].split(":", 1)[0]


def test_hostile_sysfs_content_is_refused_and_nothing_outside_is_read(lab: Lab) -> None:
    control = lab.directory / "control"
    control.write_text("x")
    os.utime(control, (time.time() - 2 * DAY, time.time() - 3 * DAY))
    before = control.stat().st_atime_ns
    control.read_text()
    if control.stat().st_atime_ns == before:
        pytest.skip("this file system does not update access times (noatime)")

    lab.host.build("samples")
    sys_dir = lab.host.root / "sys"
    mtty_types = sys_dir / "devices/virtual/mtty/mtty/mdev_supported_types"
    mdpy_types = sys_dir / "devices/virtual/mdpy/mdpy/mdev_supported_types"
    (mtty_types / "mtty-2" / "name").write_bytes(b"A" * (4 << 20))  # 4 MiB attribute
    (mdpy_types / "mdpy-hd" / "description").write_bytes(b"\xff\xfe region \xc3(")
    canary = make_canary(lab.directory / "canary")
    sound = {
        lab.host.add_instance("mtty", "mtty-2"): "none",
        lab.host.add_instance("mdpy", "mdpy-hd"): "region",
    }
    for uuid in (LOOP, OUTSIDE_TYPE, OUTSIDE_GROUP):
        lab.host.add_instance("mtty", "mtty-1", uuid=uuid)
    devices = sys_dir / "devices/virtual/mtty/mtty"
    relink(devices / LOOP / "mdev_type", "mdev_type")  # a link to itself: ELOOP
    relink(devices / OUTSIDE_TYPE / "mdev_type", lab.directory / "canary" / "type")
    relink(
        devices / OUTSIDE_GROUP / "iommu_group", "../" * 12 + str(lab.directory / "canary/group")
    )
    os.symlink(lab.directory / "canary" / "device", sys_dir / "bus/mdev/devices" / OUTSIDE_DEVICE)
    read_before = atimes(canary)

    daemon = lab.start()
    for uuid in (LOOP, OUTSIDE_TYPE, OUTSIDE_GROUP):  # and again through uevents
        lab.host.call("uevent", devpath=f"/devices/virtual/mtty/mtty/{uuid}", action="change")
    lab.wait_states(dict.fromkeys(sound, "done"))
    for uuid, display in sound.items():
        assert capabilities(lab.bus, uuid)["Display"] == display
    outcomes = {}
    for uuid in (LOOP, OUTSIDE_TYPE, OUTSIDE_GROUP, OUTSIDE_DEVICE):
        for member in ("GetCapabilities", "DomainXml", "GetDevice"):
            outcomes[(uuid[-4:], member)] = named_error(lab, member, uuid)
    escaping = f"/sys/bus/mdev/devices/{OUTSIDE_DEVICE}"
    assert named_error(lab, "GetCapabilities", escaping) == "org.vfiocaps1.Error.InvalidArgument"
    looping = f"/sys/devices/virtual/mtty/mtty/{LOOP}/mdev_type/name"
    assert named_error(lab, "GetCapabilities", looping) == "org.vfiocaps1.Error.InvalidArgument"
    types = busctl(lab.bus.address, "call", BUS_NAME, ROOT_PATH, MANAGER, "ListTypes")
    assert "A" * 4096 not in types.stdout
    assert "canary" not in types.stdout
    assert manager_property(lab.bus, "DeviceCount") >= len(sound)
    assert atimes(canary) == read_before, "a file outside the sysfs root was read"
    assert daemon.alive()
    assert "Traceback" not in daemon.log()
    print(f"hostile sysfs: {outcomes}")
