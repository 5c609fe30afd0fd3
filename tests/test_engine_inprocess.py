"""The engine in the test's own loop: fake host, scripted prober, hand-moved clock, real SQLite.

Each test runs in milliseconds: time that the engine waits for (retries, the QEMU check) is
jumped over with the clock, never slept.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.engine_rig import (
    KERNEL,
    FailingPropertiesRunner,
    ManualClock,
    ScriptedRunner,
    driver,
    host,
    mdev,
    rig_config,
    start_rig,
)
from vfiocaps.capabilities import ProbeOutcome
from vfiocaps.engine import CacheState, Timings
from vfiocaps.errors import NotFoundError, ProbeBusyError, ProbeError
from vfiocaps.model import DeviceAdded, DeviceRemoved, DriverChanged
from vfiocaps.qemubinary import QemuBinary
from vfiocaps.store import CapabilityStore


async def stored_records(directory: Path) -> list[tuple[str, str, str]]:
    store = CapabilityStore(rig_config(directory).database_path)
    await store.open()
    try:
        records = await store.load_records()
    finally:
        await store.close()
    return sorted((r.key.type_id, r.key.driver_version, r.outcome.value) for r in records)


async def test_twenty_devices_of_two_types_cause_two_probes(tmp_path: Path) -> None:
    devices = [mdev("mtty", "mtty-1") for _ in range(10)]
    devices += [mdev("mtty", "mtty-2") for _ in range(10)]
    rig = await start_rig(tmp_path, host(*devices))
    try:
        await rig.settle("done")
        assert len(rig.runner.probed) == 2
        assert rig.engine.status.probes_launched == 2
        assert rig.engine.status.device_count == 20
    finally:
        await rig.stop()
    assert rig.source.closed
    assert await stored_records(tmp_path) == [("mtty-1", "0.1", "ok"), ("mtty-2", "0.1", "ok")]


async def test_devices_arriving_during_a_probe_share_it(tmp_path: Path) -> None:
    first = mdev("mtty", "mtty-1")
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    gate = runner.hold("mtty-1")
    rig = await start_rig(tmp_path, host(first), runner=runner)
    try:
        await rig.until(lambda: runner.running == 1, "the probe to start")
        late = [mdev("mtty", "mtty-1") for _ in range(5)]
        rig.source.push(*(DeviceAdded(d) for d in late))
        await rig.until(lambda: len(rig.states()) == 6, "the late devices")
        assert set(rig.states().values()) == {"probing"}
        assert rig.engine.status.probing
        gate.set()
        await rig.settle("done")
        assert runner.probed == [first.device_id]
        assert not rig.engine.status.probing
    finally:
        await rig.stop()


async def test_a_busy_device_is_left_alone_and_its_sibling_probed(tmp_path: Path) -> None:
    held, free = mdev("mtty", "mtty-1"), mdev("mtty", "mtty-1")
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.script(
        "mtty-1",
        lambda d: ProbeOutcome.BUSY if d.device_id == held.device_id else ProbeOutcome.OK,
        lambda d: ProbeOutcome.BUSY if d.device_id == held.device_id else ProbeOutcome.OK,
    )
    rig = await start_rig(tmp_path, host(held, free), runner=runner)
    try:
        await rig.settle("done")
        assert sorted(runner.probed) == sorted([held.device_id, free.device_id])
        assert (held.device_id, "busy") in rig.listener.changes
    finally:
        await rig.stop()


async def test_when_every_instance_is_busy_the_key_is_retried_later(tmp_path: Path) -> None:
    held = mdev("mtty", "mtty-1")
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.script("mtty-1", ProbeOutcome.BUSY)
    rig = await start_rig(tmp_path, host(held), runner=runner)
    try:
        await rig.settle("busy")
        assert rig.engine.view(held.device_id).last_error == "device is in use; will retry"
        rig.clock.advance(29)
        await rig.idle()
        assert len(runner.probed) == 1
        rig.clock.advance(2)
        await rig.settle("done")
        assert len(runner.probed) == 2
    finally:
        await rig.stop()
    assert await stored_records(tmp_path) == [("mtty-1", "0.1", "ok")]


async def test_failures_back_off_exponentially_then_succeed(tmp_path: Path) -> None:
    device = mdev("mtty", "mtty-1")
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.script("mtty-1", ProbeOutcome.CRASHED, ProbeOutcome.TIMEOUT, ProbeOutcome.FAILED)
    rig = await start_rig(tmp_path, host(device), runner=runner)
    try:
        for attempt, backoff in enumerate((30, 60, 120), start=1):
            await rig.until(lambda n=attempt: len(runner.probed) == n, f"probe {attempt}")
            await rig.settle("failed")
            assert rig.engine.view(device.device_id).last_error.startswith("scripted")
            rig.clock.advance(backoff - 1)
            await rig.idle()
            assert len(runner.probed) == attempt, f"retried before {backoff} s"
            rig.clock.advance(2)
        await rig.settle("done")
        assert len(runner.probed) == 4
    finally:
        await rig.stop()


async def test_a_failure_is_remembered_across_a_restart(tmp_path: Path) -> None:
    device = mdev("mtty", "mtty-1")
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.script("mtty-1", ProbeOutcome.CRASHED)
    clock = ManualClock()
    rig = await start_rig(tmp_path, host(device), runner=runner, clock=clock)
    await rig.settle("failed")
    await rig.stop()
    again = await start_rig(tmp_path, host(device), runner=runner, clock=clock)
    try:
        await again.settle("failed")
        assert len(runner.probed) == 1
        clock.advance(31)
        await again.settle("done")
        assert len(runner.probed) == 2
    finally:
        await again.stop()


async def test_refresh_probes_anew_and_reports_outcomes(tmp_path: Path) -> None:
    device = mdev("mtty", "mtty-1")
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    rig = await start_rig(tmp_path, host(device), runner=runner)
    try:
        await rig.settle("done")
        view = await rig.engine.refresh(device.device_id)
        assert view.capabilities is not None
        assert len(runner.probed) == 2
        runner.script("mtty-1", ProbeOutcome.BUSY)
        with pytest.raises(ProbeBusyError):
            await rig.engine.refresh(device.device_id)
        runner.script("mtty-1", ProbeOutcome.CRASHED)
        with pytest.raises(ProbeError, match="scripted crashed"):
            await rig.engine.refresh(device.device_id)
        with pytest.raises(NotFoundError):
            await rig.engine.refresh("no-such-device")
    finally:
        await rig.stop()


async def test_a_driver_update_reprobes_only_its_types(tmp_path: Path) -> None:
    mtty = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(mtty))
    try:
        await rig.settle("done")
        rig.source.push(DriverChanged("mtty", driver("mtty", "0.1"), driver("mtty", "0.2")))
        await rig.until(lambda: len(rig.runner.probed) == 2, "the re-probe")
        await rig.settle("done")
        assert rig.listener.invalidations == [("mtty", "0.1", "0.2", 1)]
        assert rig.engine.view(mtty.device_id).driver == driver("mtty", "0.2")
        assert rig.engine.invalidate("other") == 0
        assert rig.engine.invalidate("mtty") == 1
        await rig.until(lambda: len(rig.runner.probed) == 3, "the re-probe after Invalidate")
        await rig.settle("done")
    finally:
        await rig.stop()
    assert await stored_records(tmp_path) == [("mtty-1", "0.2", "ok")]


async def test_a_new_kernel_invalidates_every_record(tmp_path: Path) -> None:
    device = mdev("mtty", "mtty-1")
    clock = ManualClock()
    rig = await start_rig(tmp_path, host(device), clock=clock, kernel_release="6.0.0-old")
    await rig.settle("done")
    await rig.stop()
    again = await start_rig(tmp_path, host(device), clock=clock)
    try:
        await again.settle("done")
        assert ("kernel", "6.0.0-old", KERNEL, 1) in again.listener.invalidations
        assert len(again.runner.probed) == 1
    finally:
        await again.stop()


async def test_each_probe_is_handed_the_engines_qemu_identity(tmp_path: Path) -> None:
    devices = [mdev("mtty", "mtty-1"), mdev("mtty", "mtty-2")]
    rig = await start_rig(tmp_path, host(*devices))
    try:
        await rig.settle("done")
        assert sorted(rig.runner.probed) == sorted(d.device_id for d in devices)
        assert rig.runner.identity_calls == 1  # read once, by the engine, not per probe
        handed = {qemu for qemu in rig.runner.handed}
        assert len(handed) == 1
        (qemu,) = handed
        assert qemu is not None
        assert qemu.version == rig.runner.version
    finally:
        await rig.stop()


async def test_a_warm_cache_launches_nothing(tmp_path: Path) -> None:
    devices = [mdev("mtty", "mtty-1"), mdev("mtty", "mtty-2")]
    clock = ManualClock()
    rig = await start_rig(tmp_path, host(*devices), clock=clock)
    await rig.settle("done")
    await rig.stop()
    again = await start_rig(tmp_path, host(*devices), clock=clock)
    try:
        await again.settle("done")
        assert again.runner.probed == []
        assert again.runner.identity_calls == 0  # the binary came from the cache too
    finally:
        await again.stop()


async def test_a_cold_start_asks_only_the_version_and_the_first_probe_the_properties(
    tmp_path: Path,
) -> None:
    """Serving needs the version (the cache's key); the vfio-pci properties, which shape the
    probes, are asked once, by the first probe and once probes are allowed, and then stored."""
    devices = [mdev("mtty", "mtty-1"), mdev("mtty", "mtty-2")]
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.allowed.clear()  # as before the daemon owns its name
    rig = await start_rig(tmp_path, host(*devices), runner=runner)
    try:
        await rig.idle()
        assert (runner.identity_calls, runner.properties_calls) == (1, [])
        runner.allowed.set()
        await rig.settle("done")
        assert runner.properties_calls == [True]  # once, for both probes, after the name
        assert {qemu.vfio_pci_properties for qemu in runner.handed if qemu} == {runner.properties}
    finally:
        await rig.stop()
    store = CapabilityStore(rig_config(tmp_path).database_path)
    await store.open()
    try:
        st = rig.config.qemu_binary.stat()
        found = await store.qemu_binary(str(rig.config.qemu_binary), st.st_ctime_ns, st.st_size)
    finally:
        await store.close()
    assert found is not None
    assert found.vfio_pci_properties == runner.properties


async def test_a_warm_start_without_stored_properties_asks_them_with_its_first_probe(
    tmp_path: Path,
) -> None:
    """A store that knows the binary's version only (no probe had asked the properties) serves
    without launching QEMU; the next probe asks the properties."""
    config = rig_config(tmp_path)
    st = config.qemu_binary.stat()
    store = CapabilityStore(config.database_path)
    await store.open()
    await store.remember_qemu_binary(
        QemuBinary(str(config.qemu_binary), "10.0.3", st.st_ctime_ns, st.st_size)
    )
    await store.close()
    runner = ScriptedRunner(config.qemu_binary)
    rig = await start_rig(tmp_path, host(mdev("mtty", "mtty-1")), runner=runner)
    try:
        await rig.settle("done")
        assert runner.identity_calls == 0
        assert runner.properties_calls == [True]
        assert [qemu.vfio_pci_properties for qemu in runner.handed if qemu] == [runner.properties]
    finally:
        await rig.stop()


async def test_properties_that_cannot_be_asked_leave_the_probe_to_ask_them(
    tmp_path: Path,
) -> None:
    """When the question fails the probe is handed the version alone (the prober asks then);
    nothing is stored, so the next start asks again."""
    runner = FailingPropertiesRunner(rig_config(tmp_path).qemu_binary)
    rig = await start_rig(tmp_path, host(mdev("mtty", "mtty-1")), runner=runner)
    try:
        await rig.settle("done")
        assert runner.properties_calls == [True]
        assert [qemu.vfio_pci_properties for qemu in runner.handed if qemu] == [None]
    finally:
        await rig.stop()


async def test_a_replaced_qemu_binary_invalidates_its_records(tmp_path: Path) -> None:
    device = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(device))
    try:
        await rig.settle("done")
        rig.runner.version = "10.1.0"
        rig.config.qemu_binary.write_text("qemu 10.1.0, a longer file\n")
        rig.clock.advance(31)
        await rig.until(lambda: len(rig.runner.probed) == 2, "the re-probe")
        await rig.settle("done")
        assert rig.listener.invalidations == [("qemu", "10.0.3", "10.1.0", 1)]
        status = rig.engine.status
        assert status.qemu is not None
        assert status.qemu.version == "10.1.0"
    finally:
        await rig.stop()


async def test_a_missing_qemu_binary_fails_devices_with_the_reason(tmp_path: Path) -> None:
    device = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(device), qemu_binary=tmp_path / "no-qemu")
    try:
        await rig.settle("failed")
        assert "is not usable" in rig.engine.view(device.device_id).last_error
        assert rig.runner.probed == []
    finally:
        await rig.stop()


async def test_a_device_without_iommu_group_waits_for_it(tmp_path: Path) -> None:
    early = mdev("mtty", "mtty-1", group=None)
    rig = await start_rig(tmp_path, host(early))
    try:
        await rig.settle("pending")
        assert rig.runner.probed == []
        rig.source.push(DeviceAdded(mdev("mtty", "mtty-1", uuid=early.device_id)))
        await rig.settle("done")
        assert rig.runner.probed == [early.device_id]
    finally:
        await rig.stop()


async def test_probe_type_uses_a_temporary_instance_and_removes_it(tmp_path: Path) -> None:
    rig = await start_rig(tmp_path, host())
    try:
        view = await rig.engine.probe_type("mtty", "mtty-3")
        assert view.capabilities is not None
        assert len(rig.source.created) == 1
        assert rig.source.removed == rig.source.created
        assert rig.runner.probed == rig.source.created
        again = await rig.engine.probe_type("mtty", "mtty-3")
        assert again.capabilities == view.capabilities
        assert len(rig.source.created) == 1, "a cached type needs no instance"
        with pytest.raises(NotFoundError):
            await rig.engine.probe_type("mtty", "no-such-type")
        rig.source.refuse_create = "the kernel said no"
        with pytest.raises(ProbeError, match="the kernel said no"):
            await rig.engine.probe_type("mtty", "mtty-2")
    finally:
        await rig.stop()


async def test_idle_types_are_probed_one_at_a_time_when_asked(tmp_path: Path) -> None:
    busy = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(busy), probe_types_without_instances=True)
    try:
        await rig.until(lambda: len(rig.source.removed) == 2, "both idle types probed")
        await rig.settle("done")
        types = {view.type_id: view for view in rig.engine.types()}
        assert all(types[t].capabilities is not None for t in ("mtty-1", "mtty-2", "mtty-3"))
        assert rig.runner.most_running == 1
        assert sorted(rig.source.removed) == sorted(rig.source.created)
        await rig.until(
            lambda: not any(i in rig.states() for i in rig.source.created), "instances gone"
        )
    finally:
        await rig.stop()


async def test_no_instance_is_created_before_probes_are_allowed(tmp_path: Path) -> None:
    """A second daemon, which will not get the name, learns the host but never changes it."""
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.allowed.clear()
    busy = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(busy), runner=runner, probe_types_without_instances=True)
    try:
        for _ in range(10):
            await rig.idle()
        assert rig.source.created == []
        assert rig.runner.probed == []
        runner.allowed.set()
        await rig.until(lambda: len(rig.source.removed) == 2, "both idle types probed")
    finally:
        await rig.stop()


async def test_a_corrupt_database_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    database = rig_config(tmp_path).database_path
    database.parent.mkdir(parents=True)
    database.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    device = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(device))
    try:
        await rig.settle("done")
        assert rig.engine.status.cache_state is CacheState.OK
        assert list(database.parent.glob("capabilities.sqlite.corrupt-*"))
    finally:
        await rig.stop()
    assert await stored_records(tmp_path) == [("mtty-1", "0.1", "ok")]


async def test_a_database_replaced_while_open_is_rewritten_from_memory(tmp_path: Path) -> None:
    devices = [mdev("mtty", "mtty-1"), mdev("mtty", "mtty-2")]
    rig = await start_rig(tmp_path, host(*devices), timings=Timings(store_retry=1.0))
    try:
        await rig.settle("done")
        await rig.until(lambda: len(rig.listener.statuses) > 0, "a status")
        database = rig.config.database_path
        database.unlink()
        database.write_bytes(b"not a database")
        rig.source.push(DeviceAdded(mdev("mtty", "mtty-3")))
        await rig.settle("done")
        rig.clock.advance(2)  # the writer's pause after a failed write
        await rig.until(
            lambda: list(database.parent.glob("capabilities.sqlite.corrupt-*")) != [],
            "the damaged file moved aside",
        )
        await rig.until(lambda: rig.engine.status.cache_state is CacheState.OK, "the cache back")
    finally:
        await rig.stop()
    assert [r[0] for r in await stored_records(tmp_path)] == ["mtty-1", "mtty-2", "mtty-3"]


async def test_an_unusable_cache_directory_degrades_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    device = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(device))
    try:
        await rig.settle("done")
        assert rig.engine.status.cache_state is CacheState.DEGRADED
        assert rig.engine.status.cache_error
        assert rig.engine.view(device.device_id).capabilities is not None
    finally:
        await rig.stop()


async def test_removed_devices_leave_and_are_told(tmp_path: Path) -> None:
    device = mdev("mtty", "mtty-1")
    rig = await start_rig(tmp_path, host(device))
    try:
        await rig.settle("done")
        rig.source.push(DeviceRemoved(device))
        await rig.until(lambda: rig.listener.removed == [device.device_id], "the removal")
        assert rig.engine.device_ids() == []
        with pytest.raises(NotFoundError):
            rig.engine.view(device.device_id)
    finally:
        await rig.stop()


async def test_kvm_is_looked_at_with_the_qemu_binary(tmp_path: Path) -> None:
    rig = await start_rig(tmp_path, host())
    try:
        assert not rig.engine.status.kvm_available
        kvm = rig.config.dev_root / "kvm"
        kvm.parent.mkdir(parents=True)
        kvm.write_text("")
        assert not rig.engine.status.kvm_available, "a status does not stat /dev/kvm"
        rig.clock.advance(31)
        await rig.until(lambda: rig.engine.status.kvm_available, "KVM seen at the next check")
        assert rig.listener.statuses[-1].kvm_available
    finally:
        await rig.stop()
