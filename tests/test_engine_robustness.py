"""The engine keeps serving whatever a probe does: overflowing back-off, exceptions."""

from __future__ import annotations

import asyncio
import errno
import json
import threading
import uuid as uuidlib
from pathlib import Path

import pytest

from support.engine_rig import ScriptedRunner, host, mdev, rig_config, start_rig
from vfiocaps.capabilities import ProbeOutcome
from vfiocaps.discovery.instances import InstanceLedger
from vfiocaps.engine import Timings
from vfiocaps.errors import ProbeTimeoutError
from vfiocaps.model import DeviceAdded
from vfiocaps.qemubinary import QemuBinary
from vfiocaps.store import CapabilityKey, CapabilityRecord, CapabilityStore


async def test_a_thousand_failures_do_not_overflow_the_back_off(tmp_path: Path) -> None:
    config = rig_config(tmp_path)
    device = mdev("mtty", "mtty-1")
    runner = ScriptedRunner(config.qemu_binary)
    stat = config.qemu_binary.stat()
    key = CapabilityKey(
        "mtty", "0.1", config.kernel_release, "", "mtty-1", str(config.qemu_binary), "10.0.3",
        stat.st_ctime_ns,
    )  # fmt: skip
    store = CapabilityStore(config.database_path)
    await store.open()
    await store.remember_qemu_binary(
        QemuBinary(str(config.qemu_binary), "10.0.3", stat.st_ctime_ns, stat.st_size)
    )
    await store.put_records([CapabilityRecord(key, ProbeOutcome.FAILED, None, "old", 1, 1, 1100)])
    await store.close()
    runner.script("mtty-1", ProbeOutcome.CRASHED)
    rig = await start_rig(tmp_path, host(device), runner=runner)
    try:
        await rig.settle("failed")
        assert rig.engine.view(device.device_id).last_error == "scripted crashed"
        rig.clock.advance(3599)
        await rig.idle()
        assert len(runner.probed) == 1, "the back-off is capped at an hour, not shorter"
        rig.clock.advance(2)
        await rig.settle("done")
    finally:
        await rig.stop()


async def test_an_exception_in_a_probe_settles_its_job_and_keeps_the_worker(
    tmp_path: Path,
) -> None:
    first, second = mdev("mtty", "mtty-1"), mdev("mtty", "mtty-2")
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.script("mtty-1", OSError(errno.EMFILE, "Too many open files"))
    runner.script("mtty-2", AssertionError("QMP session ended mid-command"))
    rig = await start_rig(tmp_path, host(first, second), runner=runner, probe_concurrency=1)
    try:
        await rig.settle("failed")
        errors = {view.last_error for view in rig.engine.views()}
        assert errors == {
            "internal error: [Errno 24] Too many open files",
            "internal error: QMP session ended mid-command",
        }
        assert not rig.engine.status.probing
        rig.clock.advance(31)
        await rig.settle("done")
        assert len(runner.probed) == 4, "the one worker survived both exceptions"
        third = mdev("mtty", "mtty-3")
        rig.source.push(DeviceAdded(third))
        await rig.settle("done")
    finally:
        await rig.stop()


async def test_a_temporary_instance_is_removed_only_after_its_probe_ended(tmp_path: Path) -> None:
    runner = ScriptedRunner(rig_config(tmp_path).qemu_binary)
    runner.hold("mtty-3")  # a QEMU that never answers
    rig = await start_rig(tmp_path, host(), runner=runner, probe_timeout=1.0)
    probes_at_removal: list[int] = []
    rig.source.on_remove = lambda device: probes_at_removal.append(runner.running)
    try:
        call = asyncio.ensure_future(rig.engine.probe_type("mtty", "mtty-3"))
        await rig.until(lambda: runner.running == 1, "the probe of the temporary instance")
        ledger = rig.config.runtime_dir / "temporary-instances"
        await rig.idle()
        recorded = InstanceLedger(ledger).recorded()
        rig.clock.advance(3.5)  # past the wait for the probe (three probe timeouts)
        with pytest.raises(ProbeTimeoutError, match="was stopped"):
            await call
        assert probes_at_removal == [0], "removed while its probe still ran"
        assert runner.cancelled == 1
        assert rig.source.removed == rig.source.created
        assert recorded == rig.source.created
        assert InstanceLedger(ledger).recorded() == []
    finally:
        await rig.stop()


async def test_a_removal_the_kernel_holds_does_not_block_the_loop(tmp_path: Path) -> None:
    rig = await start_rig(tmp_path, host())
    rig.source.hold_removal = threading.Event()
    try:
        call = asyncio.ensure_future(rig.engine.probe_type("mtty", "mtty-3"))
        await rig.until(lambda: len(rig.runner.probed) == 1, "the probe")
        await asyncio.sleep(0.05)  # real time: the removal is under way in its thread
        assert rig.engine.status.device_count == 1, "the loop still serves"
        rig.source.hold_removal.set()
        view = await call
        assert view.capabilities is not None
        assert rig.source.removal_released == [True], "the removal blocked the event loop"
    finally:
        rig.source.hold_removal.set()
        await rig.stop()


async def test_a_removal_that_never_ends_is_given_up_and_stays_recorded(tmp_path: Path) -> None:
    rig = await start_rig(tmp_path, host(), timings=Timings(sysfs_write=0.5))
    rig.source.hold_removal = threading.Event()
    try:
        call = asyncio.ensure_future(rig.engine.probe_type("mtty", "mtty-3"))
        await rig.until(lambda: len(rig.runner.probed) == 1, "the probe")
        await asyncio.sleep(0.05)
        rig.clock.advance(1)  # past the deadline of a sysfs write
        view = await call
        assert view.capabilities is not None
        ledger = rig.config.runtime_dir / "temporary-instances"
        assert InstanceLedger(ledger).recorded() == rig.source.created
    finally:
        rig.source.hold_removal.set()
        await rig.stop()


def _record(ledger: Path, uuid: str, boot_id: str, pid: int) -> None:
    ledger.mkdir(parents=True, exist_ok=True)
    (ledger / uuid).write_text(json.dumps({"boot_id": boot_id, "pid": pid, "uuid": uuid}))


async def test_instances_left_by_a_crashed_daemon_are_removed_at_start(tmp_path: Path) -> None:
    config = rig_config(tmp_path)
    boot = "0b0b0b0b-0000-4000-8000-000000000001"
    left, other_boot, still_owned = (str(uuidlib.uuid4()) for _ in range(3))
    devices = config.sysfs_root / "bus" / "mdev" / "devices"
    for uuid in (left, other_boot, still_owned):
        (devices / uuid).mkdir(parents=True)
        (devices / uuid / "remove").write_text("")
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    alive = await asyncio.create_subprocess_exec("sleep", "30")
    ledger = config.runtime_dir / "temporary-instances"
    _record(ledger, left, boot, dead.pid)
    _record(ledger, other_boot, "another boot", dead.pid)
    _record(ledger, still_owned, boot, alive.pid)
    try:
        rig = await start_rig(tmp_path, host(), boot_id=boot)
        await rig.stop()
    finally:
        alive.kill()
        await alive.wait()
    assert (devices / left / "remove").read_text() == "1"
    assert (devices / other_boot / "remove").read_text() == ""
    assert (devices / still_owned / "remove").read_text() == ""
    assert sorted(p.name for p in ledger.iterdir()) == [still_owned]
