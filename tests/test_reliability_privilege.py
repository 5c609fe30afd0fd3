"""Privilege through the real daemon: an unprivileged caller may read but not refresh or
invalidate (polkit, python-dbusmock's polkitd, says no), and a denied call launches nothing."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from support.callers import call
from support.daemon_lab import Lab, manager_property
from support.harness import DaemonProcess, PrivateBus, busctl, wait_until
from support.reliability import device_path

pytestmark = [
    pytest.mark.skipif(shutil.which("umockdev-wrapper") is None, reason="umockdev is missing"),
    pytest.mark.skipif(
        os.getuid() != 0 or shutil.which("setpriv") is None,
        reason="calls as another user need root and setpriv",
    ),
]

NOBODY = "65534"


def start_on(lab: Lab, bus: PrivateBus) -> DaemonProcess:
    daemon = lab.daemon(bus=bus)
    lab.daemons.append(daemon)
    daemon.start()
    wait_until(lambda: "event Resynchronised" in daemon.log(), 20, "the coldplug")
    return daemon


def test_unprivileged_callers_read_but_cannot_refresh_or_invalidate(
    lab: Lab, shared_bus: PrivateBus, polkitd: object
) -> None:
    lab.host.build("mtty")
    daemon = start_on(lab, shared_bus)
    uuid = lab.host.add_instance("mtty", "mtty-1")
    own_bus, lab.bus = lab.bus, shared_bus  # the lab's reads go to the shared bus
    try:
        lab.wait_states({uuid: "done"})
    finally:
        lab.bus = own_bus
    probes = manager_property(shared_bus, "ProbeCount")
    denied = {
        "Refresh": call(shared_bus.address, "Refresh", "s", uuid, as_user=NOBODY),
        "Invalidate": call(shared_bus.address, "Invalidate", "s", "mtty", as_user=NOBODY),
        "ProbeType": call(shared_bus.address, "ProbeType", "ss", "mtty", "mtty-1", as_user=NOBODY),
    }
    device_refresh = busctl(
        shared_bus.address, "call", "org.vfiocaps", device_path(shared_bus.address, uuid),
        "org.vfiocaps1.Device", "Refresh", check=False,
    )  # fmt: skip
    assert device_refresh.returncode == 0, device_refresh.stderr  # root needs no polkit
    wait_until(lambda: manager_property(shared_bus, "ProbeCount") == probes + 1, 20, "root's probe")
    path = device_path(shared_bus.address, uuid)
    as_nobody = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "busctl", f"--address={shared_bus.address}", "call", "org.vfiocaps", path,
        "org.vfiocaps1.Device", "Refresh",
    ]  # fmt: skip
    device_denied = subprocess.run(as_nobody, capture_output=True, text=True, timeout=30)
    for name, result in [*denied.items(), ("Device.Refresh", device_denied)]:
        assert result.returncode != 0, name
        assert "not authorized" in result.stderr, (name, result.stderr)
    reading = call(shared_bus.address, "GetCapabilities", "s", uuid, as_user=NOBODY)
    assert reading.returncode == 0, reading.stderr
    assert manager_property(shared_bus, "ProbeCount") == probes + 1  # nothing more was probed
    assert manager_property(shared_bus, "DeviceCount") == 1
    assert daemon.alive()
