"""The engine's parts on their own: keys and invalidations, back-off, device table, announcer,
background tasks, the record of temporary instances."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from support.engine_rig import KERNEL, FakeDeviceSource, driver, host, mdev
from support.owners import owner_lock_holder
from vfiocaps.capabilities import ProbeOutcome
from vfiocaps.discovery import InstanceError
from vfiocaps.discovery.instances import InstanceLedger
from vfiocaps.engine import DeviceView, EngineStatus, ProbeState, keys
from vfiocaps.engine.announcer import Announcer
from vfiocaps.engine.scheduler import FAILURE_BACKOFF_MAX, backoff_seconds
from vfiocaps.engine.table import DeviceEntry, DeviceTable
from vfiocaps.engine.typeprobe import TypeProber
from vfiocaps.errors import NotFoundError
from vfiocaps.model import Device, DeviceKind
from vfiocaps.qemubinary import QemuBinary
from vfiocaps.store import CapabilityKey, CapabilityRecord
from vfiocaps.tasks import TaskSet

QEMU = QemuBinary("/usr/bin/qemu-system-x86_64", "10.0.3", 111)


def test_a_device_has_a_key_once_driver_and_qemu_are_known() -> None:
    device = mdev("mtty", "mtty-1")
    snapshot = host(device)
    key = keys.key_for(device, snapshot, KERNEL, QEMU)
    assert key is not None
    assert (key.driver, key.driver_version, key.type_id) == ("mtty", "0.1", "mtty-1")
    assert (key.qemu_version, key.qemu_ctime_ns, key.kernel_release) == ("10.0.3", 111, KERNEL)
    assert keys.key_for(device, snapshot, KERNEL, None) is None
    orphan = replace(device, parent="gone")
    assert keys.key_for(orphan, snapshot, KERNEL, QEMU) is None


def test_a_pci_device_is_keyed_by_its_own_driver_and_ids() -> None:
    function = Device(
        kind=DeviceKind.PCI,
        device_id="0000:65:00.4",
        sysfs_path="/sys/devices/pci0000:64/0000:65:00.4",
        parent="0000:65:00.0",
        type_id="10de:2236",
        driver=driver("nvidia", "550.54"),
        pci_vendor=0x10DE,
        pci_device=0x2236,
    )
    key = keys.key_for(function, host(), KERNEL, QEMU)
    assert key is not None
    assert (key.driver, key.parent_pci_id) == ("nvidia", "10de:2236")


def _key(module: str, version: str, kernel: str = KERNEL, ctime: int = 111) -> CapabilityKey:
    return CapabilityKey(module, version, kernel, "", "t", QEMU.path, "10.0.3", ctime)


def test_invalidations_name_what_is_stale_and_why() -> None:
    cached = [_key("mtty", "0.1"), _key("mtty", "0.2"), _key("mdpy", "1")]
    reload = keys.driver_changed(cached, "mtty", driver("mtty", "0.1"), driver("mtty", "0.2"))
    assert (reload.driver, reload.old, reload.new) == ("mtty", "0.1", "0.2")
    assert reload.stale == (cached[0],)
    explicit = keys.driver_invalidated(cached, "mtty", ["0.2", "0.2"])
    assert (explicit.old, explicit.new, explicit.stale) == ("0.1,0.2", "0.2", tuple(cached[:2]))
    newer = replace(QEMU, version="10.1", ctime_ns=222)
    qemu = keys.qemu_changed(cached, QEMU, newer)
    assert (qemu.driver, qemu.old, qemu.new, len(qemu.stale)) == ("qemu", "10.0.3", "10.1", 3)


def test_at_start_records_of_other_kernels_and_binaries_are_stale() -> None:
    cached = [_key("mtty", "0.1", kernel="5.10"), _key("mtty", "0.1", kernel="6.0"),
              _key("mtty", "0.1", ctime=99), _key("mdpy", "1")]  # fmt: skip
    found = keys.at_start(cached, KERNEL, QEMU)
    assert [(i.driver, i.old, i.new, len(i.stale)) for i in found] == [
        ("kernel", "5.10", KERNEL, 1),
        ("kernel", "6.0", KERNEL, 1),
        ("qemu", "10.0.3", "10.0.3", 1),
    ]
    assert keys.at_start(cached[3:], KERNEL, QEMU) == []


def test_idle_types_skip_live_full_and_known_types() -> None:
    snapshot = host(types=("mtty-1", "mtty-2", "mtty-3", "mtty-4"))
    owner = snapshot.parents["mtty"]
    snapshot.types[("mtty", "mtty-4")] = replace(
        snapshot.types[("mtty", "mtty-4")], available_instances=0
    )
    known = keys.make_key(driver(), "", "mtty-2", KERNEL, QEMU)
    records = {known: CapabilityRecord(known, ProbeOutcome.OK, None, "", 1)}
    idle = keys.idle_types(snapshot, {("mtty", "mtty-1")}, KERNEL, QEMU, records.get, now_us=5)
    assert [(p, t.type_id) for p, t in idle] == [(owner, "mtty-3")]
    assert keys.idle_types(snapshot, set(), KERNEL, None, records.get, now_us=5) == []


def test_back_off_doubles_then_stays_at_its_cap() -> None:
    assert [backoff_seconds(30, n) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff_seconds(30, 8) == FAILURE_BACKOFF_MAX
    assert backoff_seconds(30, 1025) == FAILURE_BACKOFF_MAX
    assert backoff_seconds(30, 10**9) == FAILURE_BACKOFF_MAX
    assert backoff_seconds(7200, 3) == 7200  # a first retry longer than the cap is kept


def test_the_table_tells_every_change_once() -> None:
    told: list[tuple[str, str]] = []
    table = DeviceTable(
        added=lambda e: told.append(("added", e.state.value)),
        changed=lambda e: told.append(("changed", e.state.value)),
        removed=lambda i: told.append(("removed", i)),
    )
    device = mdev("mtty", "mtty-1")
    entry = DeviceEntry(device, None)
    table.put(entry)
    table.set_state(entry, ProbeState.PROBING)
    table.put(DeviceEntry(device, None, ProbeState.DONE))
    assert table.at_path(device.sysfs_path).state is ProbeState.DONE
    assert table.remove(device.device_id)
    assert not table.remove(device.device_id)
    assert told == [
        ("added", "pending"),
        ("changed", "probing"),
        ("changed", "done"),
        ("removed", device.device_id),
    ]
    with pytest.raises(NotFoundError):
        table.live(device.device_id)
    with pytest.raises(NotFoundError):
        table.at_path(device.sysfs_path)


class _Listener:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.statuses = 0
        self.removed: list[str] = []

    def device_added(self, view: DeviceView) -> None: ...

    def device_changed(self, view: DeviceView) -> None: ...

    def device_removed(self, device_id: str) -> None:
        if self.fail:
            raise RuntimeError("a listener bug")
        self.removed.append(device_id)

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None: ...

    def status_changed(self, status: EngineStatus) -> None:
        self.statuses += 1


def test_the_announcer_coalesces_status_and_survives_a_failing_listener() -> None:
    reads: list[int] = []

    def status() -> EngineStatus:
        reads.append(1)
        return None  # type: ignore[return-value]  # listeners here do not look at it

    announcer = Announcer(status)
    broken, listener = _Listener(fail=True), _Listener()
    announcer.subscribe(broken)
    announcer.subscribe(listener)
    with announcer.batch():
        for _ in range(1000):
            announcer.status_changed()
        with announcer.batch():
            announcer.status_changed()
    assert (listener.statuses, len(reads)) == (1, 1)
    announcer.removed("a")
    assert listener.removed == ["a"]
    announcer.unsubscribe(listener)
    announcer.unsubscribe(listener)
    announcer.removed("b")
    assert listener.removed == ["a"]


def test_the_ledger_records_and_forgets_instances(tmp_path: Path) -> None:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("b00710\n")
    ledger = InstanceLedger(tmp_path / "instances", boot_id)
    uuid = "3b4f0a52-1f4c-4a57-9a43-7c51d0f0b001"
    ledger.record(uuid)
    assert ledger.recorded() == [uuid]
    assert (tmp_path / "instances").stat().st_mode & 0o777 == 0o700
    with pytest.raises(InstanceError):
        ledger.record("../../etc/passwd")
    ledger.forget(uuid)
    assert ledger.recorded() == []
    (tmp_path / "instances" / uuid).write_text("not json")
    assert ledger.remove_leftovers(tmp_path / "sys") == []
    assert ledger.recorded() == []
    boot_id.unlink()  # hidden, as under the unit's ProcSubset=pid: recorded all the same
    ledger.record(uuid)
    assert ledger.recorded() == [uuid]


def test_leftovers_are_told_by_their_owner_lock_not_by_a_reused_pid(tmp_path: Path) -> None:
    """An instance whose daemon died is removed at start even though another process has that
    daemon's pid now; one whose daemon still holds its lock is left to it."""
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("b00710\n")
    directory = tmp_path / "instances"
    dead, running = "3b4f0a52-1f4c-4a57-9a43-7c51d0f0b002", "3b4f0a52-1f4c-4a57-9a43-7c51d0f0b003"
    for uuid in (dead, running):
        device = tmp_path / "sys" / "bus" / "mdev" / "devices" / uuid
        device.mkdir(parents=True)
        (device / "remove").write_text("")
    holder = owner_lock_holder(directory)
    reuser = subprocess.Popen(["sleep", "60"])
    try:
        (directory / f"{reuser.pid}.owner").write_text("")  # its dead writer's, unlocked
        for uuid, pid in ((dead, reuser.pid), (running, holder.pid)):
            record = {"boot_id": "b00710", "pid": pid, "uuid": uuid}
            (directory / uuid).write_text(json.dumps(record))
        ledger = InstanceLedger(directory, boot_id)
        assert ledger.remove_leftovers(tmp_path / "sys") == [dead]
        assert ledger.recorded() == [running]
    finally:
        for process in (holder, reuser):
            process.kill()
            process.wait()


async def test_a_stop_that_comes_with_a_sysfs_writes_result_is_not_lost(tmp_path: Path) -> None:
    """The engine is stopped just as a sysfs write in its thread returns: the type prober must
    stop too (Python 3.11's wait_for returned the result and dropped the cancellation, and the
    idle-type loop went on waiting after the daemon was told to stop). The stop is sent from
    the thread a few loop turns late, so that it meets the result at every step of its way."""
    loop = asyncio.get_running_loop()

    def later(turns: int, callback: Callable[[], object]) -> None:
        if turns == 0:
            callback()
        else:
            loop.call_soon(later, turns - 1, callback)

    class StoppedWhileRemoving(InstanceLedger):
        def __init__(self, turns: int) -> None:
            super().__init__(tmp_path / "instances", tmp_path / "boot_id")
            self.turns = turns
            self.task: asyncio.Future[None] | None = None
            self.accepted: list[bool] = []

        def remove_leftovers(self, sysfs_root: Path) -> list[str]:
            task = self.task
            assert task is not None
            loop.call_soon_threadsafe(
                later, self.turns, lambda: self.accepted.append(task.cancel())
            )
            return []

    def unused(*_: object) -> None:
        raise AssertionError("not called here")

    tried = []
    for turns in range(6):
        ledger = StoppedWhileRemoving(turns)
        prober = TypeProber(
            FakeDeviceSource(host()),
            ledger,
            settled=unused,  # type: ignore[arg-type]
            stop_probe=unused,  # type: ignore[arg-type]
            device=lambda _id: None,
            idle_types=list,
            allowed=unused,  # type: ignore[arg-type]
            probe_seconds=1.0,
        )
        ledger.task = asyncio.ensure_future(prober.remove_leftovers(tmp_path / "sys"))
        await asyncio.gather(ledger.task, return_exceptions=True)
        await asyncio.sleep(0.05)  # a stop that comes after the end is refused, and fine
        if ledger.accepted == [True]:  # the stop came while the write was still awaited
            tried.append(turns)
            assert ledger.task.cancelled(), f"the stop was lost {turns} loop turns after the result"
    assert tried, "no stop met the write"


async def test_the_task_set_keeps_logs_and_stops_its_tasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet("engine")
    forever = asyncio.Event()

    async def fails() -> None:
        raise OSError("a background failure")

    tasks.spawn(fails())
    tasks.spawn(forever.wait())  # type: ignore[arg-type]  # returns True, not None
    for _ in range(5):
        await asyncio.sleep(0)
    assert "engine task failed" in caplog.text
    await tasks.stop()
    assert not forever.is_set()
