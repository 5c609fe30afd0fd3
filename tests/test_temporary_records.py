"""Temporary instances and vGPU profiles leave nothing behind: recorded before they are made,
kept until seen gone after slow or failed writes, taken one VF per reservation, and recovered
only where they are still the daemon's own (not held by a VM, not changed since)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from support.engine_rig import SysfsInstanceSource, host, parent
from support.umockdev_hosts import DirectoryTestbed
from support.umockdev_sriov import H100, SriovHostBuilder
from vfiocaps.discovery.identity import IdentityResolver, ModuleFiles
from vfiocaps.discovery.instances import InstanceLedger
from vfiocaps.discovery.profiles import ProfileError, ProfileLedger, ProfileSetter
from vfiocaps.discovery.scan import HostReader
from vfiocaps.discovery.sysfs import SysfsTree
from vfiocaps.engine.typeprobe import TypeProber
from vfiocaps.errors import ProbeTimeoutError

BOOT = "3f2a9c1e-8d4b-4e6f-a1b2-c3d4e5f60718"
RELEASE = "6.12.0-test"


def boot_file(tmp_path: Path) -> Path:
    path = tmp_path / "boot_id"
    path.write_text(BOOT + "\n")
    return path


# ---- temporary mdev instances ---------------------------------------------------------------


def mtty_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A sysfs tree with the mtty parent whose mtty-1 ``create`` is a FIFO: a write to it
    blocks until the test, playing the kernel, reads it. Returns (sysfs root, create)."""
    sys_root = tmp_path / "sys"
    create = sys_root / "devices" / "virtual" / "mtty" / "mtty" / "mdev_supported_types"
    create = create / "mtty-1" / "create"
    create.parent.mkdir(parents=True)
    os.mkfifo(create)
    (sys_root / "bus" / "mdev" / "devices").mkdir(parents=True)
    return sys_root, create


def kernel_creates(sys_root: Path, create: Path, uuid: str, created: list[str]) -> None:
    """Take the write of *uuid* to *create* (later than the deadline), the instance made before
    the write returns, as the kernel does."""
    make_instance(sys_root, uuid, "mtty-1", "7")
    with create.open() as stream:
        created.append(stream.read().strip())


def make_instance(sys_root: Path, uuid: str, mdev_type: str, group: str) -> None:
    """The instance *uuid* of *mdev_type* on the mtty parent in IOMMU group *group*, with the
    kernel's relative links."""
    parent_dir = sys_root / "devices" / "virtual" / "mtty" / "mtty"
    (parent_dir / "mdev_supported_types" / mdev_type).mkdir(parents=True, exist_ok=True)
    (sys_root / "kernel" / "iommu_groups" / group).mkdir(parents=True, exist_ok=True)
    device = parent_dir / uuid
    device.mkdir()
    (device / "remove").write_text("")

    def link(at: Path, to: Path) -> None:
        at.symlink_to(os.path.relpath(to, at.parent))

    link(device / "mdev_type", parent_dir / "mdev_supported_types" / mdev_type)
    link(device / "iommu_group", sys_root / "kernel" / "iommu_groups" / group)
    devices = sys_root / "bus" / "mdev" / "devices"
    devices.mkdir(parents=True, exist_ok=True)
    link(devices / uuid, device)


def type_prober(sys_root: Path, ledger: InstanceLedger) -> tuple[TypeProber, SysfsInstanceSource]:
    owner = replace(parent(), sysfs_path=sys_root / "devices" / "virtual" / "mtty" / "mtty")
    snapshot = host()
    snapshot.parents[owner.name] = owner
    source = SysfsInstanceSource(snapshot, sys_root)

    async def nothing(*_: object) -> None:
        return None

    prober = TypeProber(
        source,
        ledger,
        settled=nothing,  # type: ignore[arg-type]
        stop_probe=nothing,
        device=lambda _id: None,
        idle_types=list,
        allowed=nothing,
        probe_seconds=1.0,
        write_seconds=0.3,
        late_seconds=10.0,
    )
    return prober, source


async def test_a_create_slower_than_its_deadline_leaves_no_instance(tmp_path: Path) -> None:
    sys_root, create = mtty_tree(tmp_path)
    ledger = InstanceLedger(tmp_path / "instances", boot_file(tmp_path))
    prober, source = type_prober(sys_root, ledger)
    owner = source.snapshot.parents["mtty"]
    with pytest.raises(ProbeTimeoutError, match="creating an instance of mtty-1 took over"):
        await prober.probe(owner, source.snapshot.types[("mtty", "mtty-1")])
    [uuid] = ledger.recorded()  # recorded before the write, kept past the deadline
    record = json.loads((ledger.directory / uuid).read_text())
    assert (record["parent"], record["type_id"]) == ("mtty", "mtty-1")
    created: list[str] = []
    await asyncio.to_thread(kernel_creates, sys_root, create, uuid, created)
    assert created == [uuid]
    for _ in range(100):  # the late write returned: the instance is removed, then forgotten
        if not ledger.recorded():
            break
        await asyncio.sleep(0.05)
    assert ledger.recorded() == []
    assert source.removed == [uuid]
    assert not (sys_root / "bus" / "mdev" / "devices" / uuid).exists()


async def test_a_late_create_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """The daemon stops while the create still blocks: the next start removes the instance."""
    sys_root, create = mtty_tree(tmp_path)
    ledger = InstanceLedger(tmp_path / "instances", boot_file(tmp_path))
    prober, source = type_prober(sys_root, ledger)
    with pytest.raises(ProbeTimeoutError):
        await prober.probe(
            source.snapshot.parents["mtty"], source.snapshot.types[("mtty", "mtty-1")]
        )
    await prober.close()  # stopped: the late write is no longer followed
    created: list[str] = []
    await asyncio.to_thread(kernel_creates, sys_root, create, ledger.recorded()[0], created)
    restarted = InstanceLedger(
        tmp_path / "instances", boot_file(tmp_path), held=lambda _d, _g: False
    )
    assert restarted.remove_leftovers(sys_root) == created
    assert (sys_root / "bus" / "mdev" / "devices" / created[0] / "remove").read_text() == "1"
    assert restarted.recorded() == []


def leftover(tmp_path: Path, uuid: str, mdev_type: str, group: str) -> tuple[Path, Path]:
    """A temporary instance a dead daemon recorded (as mtty-1 on mtty), now of *mdev_type* in
    IOMMU group *group*. Returns (sysfs root, ledger directory)."""
    sys_root = tmp_path / "sys"
    make_instance(sys_root, uuid, mdev_type, group)
    ledger_dir = tmp_path / "instances"
    ledger_dir.mkdir(exist_ok=True)
    record = {"boot_id": BOOT, "pid": 999999, "started": "1", "uuid": uuid}
    record |= {"parent": "mtty", "type_id": "mtty-1"}
    (ledger_dir / uuid).write_text(json.dumps(record))
    return sys_root, ledger_dir


def test_a_leftover_instance_a_vm_holds_is_left_and_kept(tmp_path: Path) -> None:
    uuid = "3b4f0a52-1f4c-4a57-9a43-7c51d0f0c001"
    sys_root, directory = leftover(tmp_path, uuid, "mtty-1", "41")
    asked: list[str] = []

    def held(_dev: Path, group: str) -> bool:
        asked.append(group)
        return True

    ledger = InstanceLedger(directory, boot_file(tmp_path), held=held)
    assert ledger.remove_leftovers(sys_root) == []
    assert asked == ["41"]
    assert (sys_root / "bus" / "mdev" / "devices" / uuid / "remove").read_text() == ""
    assert ledger.recorded() == [uuid]  # removed at a later start, once free
    free = InstanceLedger(directory, boot_file(tmp_path), held=lambda _d, _g: False)
    assert free.remove_leftovers(sys_root) == [uuid]


def test_a_leftover_instance_that_changed_since_is_left_alone(tmp_path: Path) -> None:
    uuid = "3b4f0a52-1f4c-4a57-9a43-7c51d0f0c002"
    sys_root, directory = leftover(tmp_path, uuid, "mtty-2", "42")  # not what was recorded
    ledger = InstanceLedger(directory, boot_file(tmp_path), held=lambda _d, _g: False)
    assert ledger.remove_leftovers(sys_root) == []
    assert (sys_root / "bus" / "mdev" / "devices" / uuid / "remove").read_text() == ""
    assert ledger.recorded() == []  # not ours: forgotten


# ---- vGPU profiles --------------------------------------------------------------------------


def sriov(tmp_path: Path) -> SriovHostBuilder:
    builder = SriovHostBuilder(DirectoryTestbed(tmp_path / "bed"), kernel_release=RELEASE)
    builder.build_sriov("h100", None)
    return builder


def reader_for(builder: SriovHostBuilder) -> HostReader:
    sysfs = SysfsTree(builder.sys)
    return HostReader(sysfs, IdentityResolver(sysfs, ModuleFiles(builder.modules_root, RELEASE)))


def profile_setter(
    builder: SriovHostBuilder, tmp_path: Path
) -> tuple[ProfileSetter, ProfileLedger]:
    ledger = ProfileLedger(tmp_path / "run" / "profiles", boot_file(tmp_path))
    setter = ProfileSetter(
        reader_for(builder),
        ledger,
        tmp_path / "dev",
        held=lambda _d, _g: False,
        write_seconds=0.3,
        late_seconds=10.0,
    )
    return setter, ledger


def attribute(builder: SriovHostBuilder, function: str) -> Path:
    return builder.sys / "bus" / "pci" / "devices" / function / "nvidia" / "current_vgpu_type"


def driver_answers(path: Path) -> None:
    """The driver takes the write at last (the writer may already have been let through by a
    reader): the FIFO is opened for reading without blocking and drained."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 64)
    finally:
        os.close(fd)


async def test_a_slow_and_unreadable_profile_write_keeps_its_record_until_cleared(
    tmp_path: Path,
) -> None:
    builder = sriov(tmp_path)
    setter, ledger = profile_setter(builder, tmp_path)
    record = setter.reserve(reader_for(builder).host().parents[H100.address], "1062")
    path = attribute(builder, record.function)
    path.unlink()
    os.mkfifo(path)  # the write blocks; a read finds nothing (unreadable)
    with pytest.raises(ProfileError, match="did not finish"):
        await setter.apply(record)
    assert ledger.functions() == {record.function}  # not taken as not done
    await asyncio.to_thread(driver_answers, path)
    path.unlink()
    path.write_text("1062\n")  # the profile was set after all
    for _ in range(100):  # cleared once the late write has returned, and only then forgotten
        if await setter.clear(record.function):
            break
        assert ledger.functions() == {record.function}
        await asyncio.sleep(0.05)
    assert ledger.functions() == set()
    assert path.read_text().strip() == "0"


async def test_an_unreadable_profile_after_a_failed_write_is_unknown_not_gone(
    tmp_path: Path,
) -> None:
    builder = sriov(tmp_path)
    setter, ledger = profile_setter(builder, tmp_path)
    record = setter.reserve(reader_for(builder).host().parents[H100.address], "1062")
    path = attribute(builder, record.function)
    path.unlink()
    path.mkdir()  # the write fails and the attribute cannot be read
    with pytest.raises(ProfileError):
        await setter.apply(record)
    assert ledger.functions() == {record.function}
    assert await setter.clear(record.function) is False  # still unknown: kept
    path.rmdir()
    path.write_text("1062\n")  # it was set after all: the next start clears it
    restarted, _ = profile_setter(builder, tmp_path)
    assert await restarted.recover() == [record.function]
    assert path.read_text().strip() == "0"
    assert ledger.functions() == set()


def test_two_reservations_at_once_never_take_the_same_vf(tmp_path: Path) -> None:
    builder = sriov(tmp_path)
    owner = reader_for(builder).host().parents[H100.address]
    for attempt in range(20):
        (tmp_path / str(attempt)).mkdir()
        setter, ledger = profile_setter(builder, tmp_path / str(attempt))
        barrier = threading.Barrier(2)
        taken: list[str] = []

        def reserve(setter: ProfileSetter, barrier: threading.Barrier, taken: list[str]) -> None:
            barrier.wait()
            taken.append(setter.reserve(owner, "1062").function)

        threads = [
            threading.Thread(target=reserve, args=(setter, barrier, taken)) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(taken)) == 2, f"attempt {attempt}: both took {taken}"
        assert ledger.functions() == set(taken)


def test_a_profile_an_administrator_set_again_is_not_cleared(tmp_path: Path) -> None:
    """A daemon set a profile and died; an administrator cleared it and set the same profile
    again for a VM before the next start: that profile is theirs, left as it is."""
    builder = sriov(tmp_path)
    setter, ledger = profile_setter(builder, tmp_path)
    record = setter.reserve(reader_for(builder).host().parents[H100.address], "1062")
    asyncio.run(setter.apply(record))
    builder.answer_writes()
    path = ledger.directory / f"{record.function}.json"
    written = json.loads(path.read_text())
    assert written["stamp"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({**written, "pid": str(dead.pid), "started": "1"}))
    builder.set_profile(record.function, "0")
    builder.set_profile(record.function, "1062")
    restarted, _ = profile_setter(builder, tmp_path)
    assert asyncio.run(restarted.recover()) == []
    assert builder.current_profile(record.function) == "1062"
    assert ledger.functions() == set()


def test_an_unchanged_leftover_profile_is_cleared(tmp_path: Path) -> None:
    builder = sriov(tmp_path)
    setter, ledger = profile_setter(builder, tmp_path)
    record = setter.reserve(reader_for(builder).host().parents[H100.address], "1062")
    asyncio.run(setter.apply(record))
    builder.answer_writes()
    path = ledger.directory / f"{record.function}.json"
    written = json.loads(path.read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({**written, "pid": str(dead.pid), "started": "1"}))
    restarted, _ = profile_setter(builder, tmp_path)
    assert asyncio.run(restarted.recover()) == [record.function]
    builder.answer_writes()
    assert builder.current_profile(record.function) == "0"
