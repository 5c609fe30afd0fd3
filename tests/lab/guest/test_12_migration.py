"""Migration per configuration on the real kernel: the round trip's figures, the kernel's flags as
the driver's source declares them and as the VFIO feature reader reads them by hand, and the
configurations the device migrates in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from labkit import (
    MTTY_STATE_BYTES,
    SAMPLE_TYPES,
    CapabilityTable,
    Daemon,
    driver_source_migration,
    kernel_config,
    read_vfio_features,
)

CASES = [(module, type_id) for module, type_ids in SAMPLE_TYPES.items() for type_id in type_ids]
# The kernel options that decide how QEMU and the kernel can track a device's dirty pages.
KERNEL_OPTIONS = (
    "CONFIG_IOMMUFD",
    "CONFIG_IOMMUFD_DRIVER",
    "CONFIG_VFIO_DEVICE_CDEV",
    "CONFIG_VFIO_CONTAINER",
    "CONFIG_VFIO_IOMMU_TYPE1",
    "CONFIG_DRM_VGEM",
)
# A round trip of a 64 MiB paused guest inside the emulated lab guest: seconds, not minutes.
ROUND_TRIP_LIMIT = 60.0
CONDITIONS = ("alone", "beside other VFIO devices", "with a virtual IOMMU")


def results_file(name: str) -> Path | None:
    value = os.environ.get("VFIOCAPS_LAB_RESULTS")
    return Path(value) / name if value else None


def test_kernel_config_is_recorded() -> None:
    config = kernel_config(KERNEL_OPTIONS)
    target = results_file("kernel-config.json")
    if target is not None:
        target.write_text(json.dumps(config, indent=2) + "\n")
    # The lab's premise (see the README): the legacy type1 container, no iommufd cdev.
    assert config["CONFIG_VFIO_CONTAINER"] == "y", config
    assert config["CONFIG_VFIO_DEVICE_CDEV"] == "n", config
    assert config["CONFIG_DRM_VGEM"] in ("m", "y"), config


@pytest.mark.parametrize(("module", "type_id"), CASES)
def test_round_trip_figures(
    daemon: Daemon, samples: dict[str, str], module: str, type_id: str
) -> None:
    props = daemon.wait_settled(samples[type_id])
    best = props["MigrationWithOptions"] if props["MigrationOptions"] else props["Migration"]
    state, save, load = (
        props["MigrationStateBytes"],
        props["MigrationSaveSeconds"],
        props["MigrationLoadSeconds"],
    )
    if best == "supported":
        assert state == MTTY_STATE_BYTES[type_id], (type_id, state)
        assert 0 < save < ROUND_TRIP_LIMIT, save
        assert 0 < load < ROUND_TRIP_LIMIT, load
    else:
        assert (state, save, load) == (0, 0.0, 0.0), props


@pytest.mark.parametrize(("module", "type_id"), CASES)
def test_kernel_flags_match_the_driver_source(
    daemon: Daemon, samples: dict[str, str], table: CapabilityTable, module: str, type_id: str
) -> None:
    mdev_uuid = samples[type_id]
    props = daemon.wait_settled(mdev_uuid)
    declared = driver_source_migration(module)
    by_hand = read_vfio_features(mdev_uuid)
    table.record(type_id, reader=by_hand, source_flags=sorted(declared.flags))
    assert by_hand["observable"] is True, by_hand
    assert set(by_hand["flags"]) == declared.flags, (by_hand, declared)
    assert by_hand["dirty_tracking"] is declared.dirty_tracking, (by_hand, declared)
    assert set(props["MigrationFlags"]) == declared.flags, (props["MigrationFlags"], declared)
    assert len(props["MigrationFlags"]) == len(set(props["MigrationFlags"]))
    tracking = "supported" if declared.dirty_tracking else "unsupported"
    assert props["DeviceDirtyTracking"] == tracking, props["DeviceDirtyTracking"]
    if module == "mtty":
        assert declared.flags == {"stop-copy", "p2p", "pre-copy"}, declared


@pytest.mark.parametrize(("module", "type_id"), CASES)
def test_migration_conditions(
    daemon: Daemon, samples: dict[str, str], module: str, type_id: str
) -> None:
    props = daemon.wait_settled(samples[type_id])
    rows = {row[0]: tuple(row) for row in props["MigrationConditions"]}
    assert tuple(rows) == CONDITIONS, props["MigrationConditions"]
    for condition, verdict, decided_by, reason in rows.values():
        assert verdict in ("supported", "unsupported", "unknown"), condition
        assert decided_by in ("qemu", "kernel"), condition
        assert reason, condition
    best = props["MigrationWithOptions"] if props["MigrationOptions"] else props["Migration"]
    alone = rows["alone"]
    assert (alone[1], alone[2]) == (best, "qemu"), alone
    qemu_10_0 = str(props["QemuVersion"]).startswith("10.0")
    if best != "supported":
        assert all(row[1] == best and row[2] == "qemu" for row in rows.values()), rows
        return
    beside = rows["beside other VFIO devices"]
    p2p = "p2p" in driver_source_migration(module).flags
    assert beside[1:3] == ("supported" if p2p else "unsupported", "kernel"), beside
    viommu = rows["with a virtual IOMMU"]
    if qemu_10_0:
        # QEMU 8.1 to 10.0 block a VFIO device's migration behind a virtual IOMMU.
        assert viommu[1:3] == ("unsupported", "qemu"), viommu


def test_defaults_fail_where_the_kernel_cannot_report_dma_logging(
    daemon: Daemon, samples: dict[str, str]
) -> None:
    """mtty gives the VFIO core DMA logging operations, so QEMU's defaults track its dirty pages
    through the device; the kernel reports that log through its IOVA bitmaps, which exist only
    with CONFIG_IOMMUFD_DRIVER. Without it the save fails, as the daemon reports."""
    mdev_uuid = samples["mtty-1"]
    props = daemon.wait_settled(mdev_uuid)
    assert driver_source_migration("mtty").dirty_tracking
    assert read_vfio_features(mdev_uuid)["dirty_tracking"] is True
    if kernel_config(("CONFIG_IOMMUFD_DRIVER",))["CONFIG_IOMMUFD_DRIVER"] != "n":
        pytest.skip("this kernel can report DMA logging: QEMU's defaults may migrate")
    assert props["Migration"] == "unsupported", props
    notes = " ".join(props["MigrationNotes"])
    assert "could not read the log" in notes, props["MigrationNotes"]
