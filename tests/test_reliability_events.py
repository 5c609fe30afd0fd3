"""Event storms through the real daemon: 10,000 uevents in one burst, the same UUID added and
removed in a race, a parent unregistering while its device is being probed."""

from __future__ import annotations

import shutil
import time

import pytest

from daemon_lab import Lab, capabilities, manager_property
from harness import BUS_NAME, ROOT_PATH, gdbus, wait_until
from test_reliability_helpers import (
    daemon_pid,
    device_objects,
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
        lambda: all(p["ProbeState"] == "done" for p in device_objects(lab).values()),
        60,
        "every device answered",
        interval=0.5,
    )
    elapsed = time.monotonic() - started
    objects = device_objects(lab)
    assert set(objects) == set(storm["uuids"])
    assert manager_property(lab.bus, "ProbeCount") == 1
    assert capabilities(lab.bus, storm["uuids"][-1])["Migration"] == "supported"
    assert daemon.alive()
    print(
        f"{instances * 4} uevents sent in {storm['ended'] - storm['began']:.1f} s; "
        f"{instances} devices served, 1 probe, {elapsed:.1f} s after the burst"
    )


def test_the_same_uuid_added_and_removed_in_a_race(lab: Lab) -> None:
    lab.host.build("mtty")
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
    lab.wait_states({RACER: "done"})
    assert manager_property(lab.bus, "DeviceCount") == 1
    assert list(device_objects(lab)) == [RACER]
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
    assert capabilities(lab.bus, again)["Migration"] == "supported"
    assert daemon.alive()
    assert "engine task failed" not in daemon.log()
