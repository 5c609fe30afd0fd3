"""A second instance of a probed type is answered from the cache; removal unpublishes."""

from __future__ import annotations

from labkit import SAMPLE_TYPES, CapabilityTable, Daemon, MdevLab, SignalWatch, wait_for

COMPARED = ("Display", "GlRequired", "Migration", "MigrationBlockers", "DriverVersion", "TypeId")


def settle_all(daemon: Daemon, samples: dict[str, str]) -> None:
    for mdev_uuid in samples.values():
        daemon.wait_settled(mdev_uuid)
    wait_for(lambda: daemon.prop("Probing") is False, 120, "the daemon to finish probing")


def test_second_instance_launches_no_qemu(
    daemon: Daemon, mdevs: MdevLab, samples: dict[str, str], table: CapabilityTable
) -> None:
    settle_all(daemon, samples)
    probes_before = daemon.prop("ProbeCount")
    for module, type_ids in SAMPLE_TYPES.items():
        type_id = type_ids[0]
        first = daemon.wait_settled(samples[type_id])
        second_uuid = mdevs.create(module, type_id)
        second = daemon.wait_settled(second_uuid)
        assert second["ProbeState"] == "done", second
        for name in COMPARED:
            assert second[name] == first[name], f"{type_id}: {name} differs: {second} / {first}"
        assert daemon.prop("ProbeCount") == probes_before, f"{type_id} launched a probe"
        table.record(type_id, cache_hit="yes, no QEMU launched")
        mdevs.remove(second_uuid)


def test_removed_instance_is_unpublished(
    daemon: Daemon, mdevs: MdevLab, samples: dict[str, str], signal_watch: SignalWatch
) -> None:
    settle_all(daemon, samples)
    mdev_uuid = mdevs.create("mdpy", SAMPLE_TYPES["mdpy"][0])
    path, _ = daemon.device_by_uuid(mdev_uuid) or wait_for(
        lambda: daemon.device_by_uuid(mdev_uuid), 60, "the new instance to be published"
    )
    daemon.wait_settled(mdev_uuid)
    count = daemon.prop("DeviceCount")
    mdevs.remove(mdev_uuid)
    wait_for(lambda: daemon.device_by_uuid(mdev_uuid) is None, 60, "the object to go")
    assert daemon.prop("DeviceCount") == count - 1
    assert path not in daemon.manager("ListDevices")
    wait_for(
        lambda: any(body and body[0] == path for body in signal_watch.signals("InterfacesRemoved")),
        30,
        "InterfacesRemoved for the removed instance",
    )
