"""The engine keeps serving whatever a probe does: overflowing back-off, exceptions."""

from __future__ import annotations

import errno
from pathlib import Path

from support.engine_rig import ScriptedRunner, host, mdev, rig_config, start_rig
from vfiocaps.capabilities import ProbeOutcome
from vfiocaps.model import DeviceAdded
from vfiocaps.store import CapabilityKey, CapabilityRecord, CapabilityStore


async def test_a_thousand_failures_do_not_overflow_the_back_off(tmp_path: Path) -> None:
    config = rig_config(tmp_path)
    device = mdev("mtty", "mtty-1")
    runner = ScriptedRunner(config.qemu_binary)
    identity = await runner.qemu_identity()
    stat = config.qemu_binary.stat()
    key = CapabilityKey(
        "mtty", "0.1", config.kernel_release, "", "mtty-1", identity.path, identity.version,
        stat.st_ctime_ns,
    )  # fmt: skip
    store = CapabilityStore(config.database_path)
    await store.open()
    await store.remember_qemu_version(identity.path, stat.st_ctime_ns, stat.st_size, "10.0.3")
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
