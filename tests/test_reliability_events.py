"""Event storms through the real daemon: 10,000 uevents in one burst, the same UUID added and
removed in a race, a parent unregistering while its device is being probed."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from support.daemon_lab import Lab, capabilities, manager_property
from support.harness import BUS_NAME, ROOT_PATH, gdbus, wait_until
from support.prober import make_group_node
from support.reliability import (
    daemon_pid,
    probe_leftovers,
    qemu_pids,
    zombie_children,
)

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

RACER = "0f0f0f0f-0000-4000-8000-00000000ace5"


@pytest.mark.slow
def test_ten_thousand_uevents_in_one_burst(lab: Lab) -> None:
    instances = 2500  # four uevents each: add, vfio group add, vfio-dev add, bind
    lab.host.build("mtty", capacity={"mtty-1": instances})
    daemon = lab.start()
    storm = lab.host.storm("mtty", "mtty-1", instances)
    started = time.monotonic()
    wait_until(
        lambda: manager_property(lab.bus, "DeviceCount") == instances,
        60,
        f"{instances} devices",
        interval=0.5,
    )
    wait_until(
        lambda: all(p["ProbeState"] == "done" for p in lab.devices().values()),
        60,
        "every device answered",
        interval=0.5,
    )
    elapsed = time.monotonic() - started
    objects = lab.devices()
    assert set(objects) == set(storm["uuids"])
    assert manager_property(lab.bus, "ProbeCount") == 1
    assert capabilities(lab.bus, storm["uuids"][-1])["MigrationWithOptions"] == "supported"
    assert daemon.alive()
    print(
        f"{instances * 4} uevents sent in {storm['ended'] - storm['began']:.1f} s; "
        f"{instances} devices served, 1 probe, {elapsed:.1f} s after the burst"
    )


def more_group_nodes(lab: Lab, count: int) -> None:
    """Every add makes a new IOMMU group; the lab has nodes for the first 64 only."""
    for group in range(64, count):
        make_group_node(lab.dev / "vfio" / str(group))


def test_the_same_uuid_added_and_removed_in_a_race(lab: Lab) -> None:
    lab.host.build("mtty")
    more_group_nodes(lab, 256)
    daemon = lab.start()
    cycles = 40
    for _ in range(cycles):
        lab.host.add_instance("mtty", "mtty-1", uuid=RACER)
        lab.host.remove_instance(RACER)
    time.sleep(1)
    assert manager_property(lab.bus, "DeviceCount") == 0
    gone = gdbus(
        lab.bus.address, "call", "--dest", BUS_NAME, "--object-path", ROOT_PATH,
        "--method", "org.vfiocaps1.Manager.GetDevice", RACER, check=False,
    )  # fmt: skip
    assert "org.vfiocaps1.Error.NotFound" in gone.stderr
    for _ in range(cycles):
        lab.host.remove_instance(lab.host.add_instance("mtty", "mtty-1", uuid=RACER))
    lab.host.add_instance("mtty", "mtty-1", uuid=RACER)
    try:
        lab.wait_states({RACER: "done"}, timeout=20)
    except AssertionError:
        quiet = [line for line in daemon.log().splitlines() if "event " not in line]
        raise AssertionError(f"{lab.states()}: {quiet[-20:]}") from None
    assert manager_property(lab.bus, "DeviceCount") == 1
    assert list(lab.devices()) == [RACER]
    assert capabilities(lab.bus, RACER)["Display"] == "none"
    assert daemon.alive()
    print(f"{2 * cycles + 1} add/remove cycles of one UUID ({(4 * 2) * 2 * cycles + 4} uevents)")


def test_a_parent_unregistering_while_its_device_is_probed(lab: Lab) -> None:
    lab.host.build("mtty")
    lab.overrides({"devices": {RACER: {"fault": {"on": "query-migrate", "pause_seconds": 1}}}})
    daemon = lab.start()
    pid = daemon_pid(daemon)
    lab.host.add_instance("mtty", "mtty-1", uuid=RACER)
    wait_until(lambda: qemu_pids(lab), 20, "the probe QEMU")
    lab.host.unregister_parent("mtty")
    wait_until(lambda: manager_property(lab.bus, "DeviceCount") == 0, 10, "the device to go")
    wait_until(lambda: not qemu_pids(lab) and not probe_leftovers(daemon), 20, "the probe to end")
    assert zombie_children(pid) == []
    lab.host.register_parent("mtty")
    again = lab.host.add_instance("mtty", "mtty-2")
    lab.wait_states({again: "done"})
    assert capabilities(lab.bus, again)["MigrationWithOptions"] == "supported"
    assert daemon.alive()
    assert "engine task failed" not in daemon.log()


def test_a_device_removed_during_its_probe_does_not_fail_its_type(lab: Lab) -> None:
    """The probe of a vanished device fails ("no such host device"); that says nothing about
    its type, so the UUID created again (or a sibling) must not inherit a cached failure."""
    lab.host.build("mtty")
    # QEMU waits at realize far longer than the test needs to remove the instance, however
    # loaded the machine is; the instance created again probes without the wait.
    lab.overrides({"devices": {RACER: {"fault": {"on": "realize", "pause_seconds": 15}}}})
    daemon = lab.start("--probe-retry-seconds", "600")
    lab.host.add_instance("mtty", "mtty-1", uuid=RACER)
    wait_until(lambda: qemu_pids(lab, RACER), 60, "the probe QEMU")
    lab.host.remove_instance(RACER)
    wait_until(lambda: not qemu_pids(lab), 60, "the probe to fail")
    lab.overrides({})
    lab.host.add_instance("mtty", "mtty-1", uuid=RACER)
    lab.wait_states({RACER: "done"}, timeout=20)
    assert capabilities(lab.bus, RACER)["MigrationWithOptions"] == "supported"
    assert "no such host device" in daemon.log()


def test_a_device_without_its_iommu_group_yet_is_probed_once_it_has_one(lab: Lab) -> None:
    """An mdev gets its IOMMU group when its driver binds, after its ``add`` uevent: a device
    seen before that must wait for the group, not cache a failure for its type."""
    lab.host.build("mtty")
    uuid = lab.host.add_instance("mtty", "mtty-1")
    link = lab.host.root / "sys/devices/virtual/mtty/mtty" / uuid / "iommu_group"
    target = os.readlink(link)
    link.unlink()
    lab.start("--probe-retry-seconds", "600")
    wait_until(lambda: uuid in lab.states(), 10, "the device")
    time.sleep(0.5)
    assert lab.states()[uuid] != "done"
    os.symlink(target, link)
    lab.host.call("uevent", devpath=f"/devices/virtual/mtty/mtty/{uuid}", action="bind")
    lab.wait_states({uuid: "done"}, timeout=20)
    assert capabilities(lab.bus, uuid)["MigrationWithOptions"] == "supported"
