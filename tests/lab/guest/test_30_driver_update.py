"""Reloading a driver with a different version invalidates its cache and re-probes by itself."""

from __future__ import annotations

import shutil
import subprocess
import time

from labkit import (
    SAMPLE_TYPES,
    CapabilityTable,
    Daemon,
    MdevLab,
    SignalWatch,
    installed_module_path,
    lab_module_variant,
    wait_for,
)


def unload(module: str) -> None:
    for _ in range(20):
        if subprocess.run(["modprobe", "-r", module], check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{module} cannot be unloaded")


def test_new_driver_version_is_reprobed(
    daemon: Daemon,
    mdevs: MdevLab,
    samples: dict[str, str],
    signal_watch: SignalWatch,
    table: CapabilityTable,
) -> None:
    type_id = SAMPLE_TYPES["mtty"][0]
    before = daemon.wait_settled(samples[type_id])
    assert before["ProbeState"] == "done", before
    old_version = mdevs.module_version("mtty")
    for mdev_uuid in mdevs.instances_of("mtty"):
        mdevs.remove(mdev_uuid)
        wait_for(lambda u=mdev_uuid: daemon.device_by_uuid(u) is None, 60, f"{mdev_uuid} to go")
    unload("mtty")
    # The update build replaces the file at the same path with the same dependencies, so
    # modules.dep still leads modprobe to it: no depmod (a minute under TCG).
    shutil.copyfile(lab_module_variant("update", "mtty"), installed_module_path("mtty"))
    found = subprocess.run(
        ["modinfo", "-F", "filename", "mtty"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert found == str(installed_module_path("mtty")), f"modprobe would load {found}"
    seen_before = len(signal_watch.signals("CacheInvalidated"))
    probes_before = daemon.prop("ProbeCount")
    mdevs.load("mtty")
    new_version = mdevs.module_version("mtty")
    assert new_version != old_version, "the lab's update build of mtty has the same version"

    for module_type in SAMPLE_TYPES["mtty"]:
        samples[module_type] = mdevs.create("mtty", module_type)
    after = daemon.wait_settled(samples[type_id])
    invalidations = wait_for(
        lambda: [
            body
            for body in signal_watch.signals("CacheInvalidated")[seen_before:]
            if body and body[0] == "mtty"
        ],
        120,
        "CacheInvalidated for mtty",
    )
    _, old_reported, new_reported, _records = invalidations[0]
    assert old_reported == before["DriverVersion"]
    assert new_reported == after["DriverVersion"] != before["DriverVersion"]
    assert new_version in after["DriverVersion"]
    assert after["ProbeState"] == "done", after
    assert daemon.prop("ProbeCount") > probes_before, "the new driver was not probed"
    for name in ("Display", "GlRequired", "Migration"):
        assert after[name] == before[name]
    for module_type in SAMPLE_TYPES["mtty"]:
        row = daemon.wait_settled(samples[module_type])
        table.record(module_type, version=f"{before['DriverVersion']} -> {row['DriverVersion']}")
