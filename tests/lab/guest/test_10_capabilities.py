"""The daemon publishes what each sample mdev driver can do, matching sysfs and QEMU 10."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    DEFAULTS_SAVE_ERROR,
    DEVICE,
    EXPECTED,
    MTTY_OPTIONS,
    SAMPLE_TYPES,
    SYSFS,
    CapabilityTable,
    Daemon,
    MdevLab,
)

CASES = [(module, type_id) for module, type_ids in SAMPLE_TYPES.items() for type_id in type_ids]


def test_manager_describes_the_host(daemon: Daemon) -> None:
    assert daemon.prop("Version")
    assert daemon.prop("KernelRelease") == os.uname().release
    qemu = daemon.prop("QemuBinary")
    assert Path(qemu).is_file(), qemu
    assert str(daemon.prop("QemuVersion")).startswith("10."), daemon.prop("QemuVersion")
    assert daemon.prop("KvmAvailable") is Path("/dev/kvm").exists()
    assert isinstance(daemon.prop("Probing"), bool)
    assert isinstance(daemon.prop("DeviceCount"), int)
    assert isinstance(daemon.prop("ProbeCount"), int)


def record(table: CapabilityTable, module: str, mdevs: MdevLab, props: dict[str, Any]) -> None:
    notes = [*props.get("MigrationNotes", []), *props.get("MigrationBlockers", [])]
    if props.get("ProbeState") != "done":
        notes.append(f"{props.get('ProbeState')}: {props.get('LastError')}")
    options = ",".join(f"{name}={value}" for name, value in props.get("MigrationOptions", []))
    with_options = str(props.get("MigrationWithOptions", ""))
    conditions = "; ".join(
        f"{condition}: {verdict} ({decided_by})"
        for condition, verdict, decided_by, _ in props.get("MigrationConditions", [])
    )
    table.record(
        props.get("TypeId") or mdevs.type_of(str(props["Uuid"])),
        driver=module,
        version=props.get("DriverVersion", ""),
        name=props.get("TypeName", ""),
        display=props.get("Display", ""),
        gl="required" if props.get("GlRequired") else "not required",
        gl_host=props.get("GlHost", ""),
        migration=props.get("Migration", ""),
        migration_with_options=f"{with_options} ({options})" if options else with_options,
        state_bytes=props.get("MigrationStateBytes", ""),
        save_load=f"{props.get('MigrationSaveSeconds', 0):.2f} / "
        f"{props.get('MigrationLoadSeconds', 0):.2f}",
        flags=f"{', '.join(props.get('MigrationFlags', [])) or 'none'}; DMA logging "
        f"{props.get('DeviceDirtyTracking', '')}",
        conditions=conditions,
        notes="; ".join(map(str, notes)),
    )


@pytest.mark.parametrize(("module", "type_id"), CASES)
def test_device_capabilities(
    daemon: Daemon,
    mdevs: MdevLab,
    samples: dict[str, str],
    table: CapabilityTable,
    module: str,
    type_id: str,
) -> None:
    mdev_uuid = samples[type_id]
    props = daemon.wait_settled(mdev_uuid)
    record(table, module, mdevs, props)
    assert props["ProbeState"] == "done", f"{props}\n{daemon.journal()}"
    assert props["LastError"] == ""
    for name, value in EXPECTED[module].items():
        assert props[name] == value, f"{type_id}: {name} is {props[name]!r}, not {value!r}"
    if props["Migration"] == "supported":
        assert props["MigrationBlockers"] == [], props
    else:
        assert props["MigrationBlockers"], props
    if module == "mtty":
        blockers = " ".join(props["MigrationBlockers"])
        assert DEFAULTS_SAVE_ERROR in blockers, props["MigrationBlockers"]
        assert props["MigrationOptions"] == MTTY_OPTIONS, props["MigrationOptions"]
        notes = " ".join(props["MigrationNotes"]).lower()
        assert "x-device-dirty-page-tracking=off" in notes, props["MigrationNotes"]
    else:
        assert props["MigrationOptions"] == [], props["MigrationOptions"]
    if props["GlHost"] == "no-render-node":
        assert props["GlRenderNode"] == ""
        assert "no DRM render node" in props["GlDetail"], props["GlDetail"]
    elif props["GlHost"] == "not-needed":
        assert props["GlRenderNode"] == props["GlDetail"] == ""
    assert props["ProbedAt"] > 0
    assert props["QemuVersion"] == daemon.prop("QemuVersion")


@pytest.mark.parametrize(("module", "type_id"), CASES)
def test_device_identity_matches_sysfs(
    daemon: Daemon, mdevs: MdevLab, samples: dict[str, str], module: str, type_id: str
) -> None:
    mdev_uuid = samples[type_id]
    path, props = daemon.device_by_uuid(mdev_uuid) or (None, {})
    assert path is not None, f"{mdev_uuid} is not published"
    sysfs = (SYSFS / "bus/mdev/devices" / mdev_uuid).resolve()
    type_dir = sysfs / "mdev_type"
    assert Path(props["SysfsPath"]).resolve() == sysfs
    assert props["TypeId"] == type_id
    assert props["TypeName"] == (type_dir / "name").read_text().strip()
    assert props["DeviceApi"] == (type_dir / "device_api").read_text().strip() == "vfio-pci"
    assert props["Driver"] == module
    assert str(props["Parent"]).rstrip("/").rsplit("/", 1)[-1] == mdevs.parent_dir(module).name
    assert props["DriverVersion"]
    assert mdevs.module_version(module) in props["DriverVersion"]
    assert daemon.manager("GetDevice", "s", props["Id"]) == path
    assert path in daemon.manager("ListDevices")
    capabilities = daemon.manager("GetCapabilities", "s", props["Id"])
    assert isinstance(capabilities, dict)
    assert capabilities


def test_types_and_counts(daemon: Daemon, samples: dict[str, str]) -> None:
    for mdev_uuid in samples.values():
        daemon.wait_settled(mdev_uuid)
    listed = daemon.manager("ListTypes")
    listed_values = {str(value) for entry in listed for value in entry.values()}
    for type_id in samples:
        assert type_id in listed_values, f"{type_id} missing from ListTypes: {listed}"
    assert daemon.prop("DeviceCount") == len(daemon.devices()) >= len(samples)
    objects = daemon.objects()
    assert all(DEVICE in objects[path] for path in daemon.manager("ListDevices"))
