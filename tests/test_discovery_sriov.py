"""SR-IOV in discovery, in process: VF profiles as types, variant-driver VFs as devices, the
events of VFs and profiles, and setting and clearing a profile with its crash record."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from support.umockdev_hosts import DirectoryTestbed
from support.umockdev_sriov import H100, MLX5, XE, SriovHostBuilder, recorded_uevents
from vfiocaps.bootid import UNKNOWN_BOOT
from vfiocaps.config import Config
from vfiocaps.discovery import Discovery
from vfiocaps.discovery.functions import parse_profiles
from vfiocaps.discovery.identity import IdentityResolver, ModuleFiles
from vfiocaps.discovery.monitor import Uevent
from vfiocaps.discovery.profiles import (
    ProfileError,
    ProfileLedger,
    ProfileRecord,
    ProfileSetter,
)
from vfiocaps.discovery.profilewatch import ProfileWatch
from vfiocaps.discovery.scan import HostReader
from vfiocaps.discovery.state import HostState
from vfiocaps.discovery.sysfs import SysfsTree
from vfiocaps.errors import InvalidArgumentError
from vfiocaps.model import (
    NEEDS_GPU_INSTANCE,
    DeviceAdded,
    DeviceKind,
    DeviceRemoved,
    DiscoveryEvent,
    ParentRegistered,
    ParentUnregistered,
    TypeKind,
)
from vfiocaps.prober import ProbeTarget
from vfiocaps.statefile import process_start

RELEASE = "6.12.0-test"
BOOT = "3f2a9c1e-8d4b-4e6f-a1b2-c3d4e5f60718"


def make_host(tmp_path: Path, *keys: str, vfs: int | None = None) -> SriovHostBuilder:
    builder = SriovHostBuilder(DirectoryTestbed(tmp_path / "bed"), kernel_release=RELEASE)
    for key in keys:
        builder.build_sriov(key, vfs)
    return builder


def reader_for(builder: SriovHostBuilder) -> HostReader:
    sysfs = SysfsTree(builder.sys)
    return HostReader(sysfs, IdentityResolver(sysfs, ModuleFiles(builder.modules_root, RELEASE)))


def watched(state: HostState, watch: ProfileWatch) -> list[DiscoveryEvent]:
    """One pass of *watch* over what *state* knows, each VF it names read again as discovery
    does (a ``change`` of the VF): the events that gives."""
    sysfs = state.reader.sysfs
    events: list[DiscoveryEvent] = []
    for function in watch.changed(state.snapshot()):
        real = sysfs.resolve(sysfs.path(f"bus/pci/devices/{function}"))
        assert real is not None
        devpath = "/" + str(real.relative_to(sysfs.root))
        events.extend(state.apply(Uevent("change", devpath, "pci")))
    return events


def boot_id_file(tmp_path: Path, value: str = BOOT) -> Path:
    path = tmp_path / "boot_id"
    path.write_text(value + "\n")
    return path


def test_creatable_lists_parse_with_their_heading_and_noise() -> None:
    text = (
        "ID    : vGPU Name\n1060  : NVIDIA H100-20C\n\ngarbage\n0 : none\n1062 : NVIDIA H100-80C\n"
    )
    assert parse_profiles(text) == (("1060", "NVIDIA H100-20C"), ("1062", "NVIDIA H100-80C"))
    assert parse_profiles("ID    : vGPU Name\n") == ()


def test_coldplug_profiles_are_types_of_the_physical_function(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100", "xe", "mlx5")
    snapshot = reader_for(builder).host()
    parent = snapshot.parents[H100.address]
    assert (parent.subsystem, parent.pci_id) == ("pci", "10de:2331")
    assert parent.driver is not None
    assert (parent.driver.module, parent.driver.version) == ("nvidia", "570.133.10")
    profiles = {t.type_id: t for (p, _), t in snapshot.types.items() if p == H100.address}
    assert {
        n: (t.name, t.available_instances, t.kind, t.requires) for n, t in profiles.items()
    } == {
        "1060": ("NVIDIA H100-20C", 4, TypeKind.VF_PROFILE, ""),
        "1061": ("NVIDIA H100-40C", 4, TypeKind.VF_PROFILE, ""),
        "1062": ("NVIDIA H100-80C", 4, TypeKind.VF_PROFILE, ""),
        "1070": ("NVIDIA H100-1-10C", 4, TypeKind.VF_PROFILE, NEEDS_GPU_INSTANCE),
    }
    assert snapshot.functions == {H100.vf_address(i): H100.address for i in range(4)}
    # nvidia.ko registers every VF with vfio-pci-core: each has vfio-dev, profile or not.
    assert all(
        (builder.sys / "bus/pci/devices" / H100.vf_address(i) / "vfio-dev").is_dir()
        for i in range(4)
    )
    # No profile set: no NVIDIA VF is a device yet (none can be opened); the variant VFs are.
    assert sorted(snapshot.devices) == ["0000:03:00.4", "0000:03:00.5", "0000:5e:00.4"]
    assert XE.address not in snapshot.parents
    assert MLX5.address not in snapshot.parents


def test_a_variant_driver_vf_is_keyed_by_its_driver_and_its_pf_driver(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "xe", "mlx5")
    devices = reader_for(builder).host().devices
    mlx5 = devices["0000:5e:00.4"]
    assert (mlx5.kind, mlx5.parent, mlx5.type_id) == (DeviceKind.PCI, MLX5.address, "15b3:101e")
    assert mlx5.driver is not None
    assert mlx5.driver.module == "mlx5_vfio_pci"
    assert mlx5.parent_version.startswith("mlx5_core ")
    assert mlx5.parent_version.endswith(" fw 28.39.1002")
    xe = devices["0000:03:00.4"]
    assert xe.driver is not None
    assert (xe.driver.module, xe.driver.version_source) == ("xe_vfio_pci", "srcversion")
    # xe declares no version and no srcversion: its module file's fingerprint; no firmware.
    assert xe.parent_version.startswith("xe sha256:")
    assert " fw " not in xe.parent_version


def test_vfs_enabled_profiles_set_and_cleared_and_vfs_disabled(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100", vfs=0)
    reader = reader_for(builder)
    state = HostState(reader)
    state.resync(reader.host())
    assert H100.address not in state.parents
    mark = len(builder.testbed.uevents)
    builder.enable_vfs("h100", 4)
    events = [e for u in recorded_uevents(builder, mark) for e in state.apply(u)]
    registered = [e for e in events if isinstance(e, ParentRegistered)]
    assert registered
    assert registered[-1].parent.name == H100.address
    assert {t.type_id for t in registered[-1].types} == {"1060", "1061", "1062", "1070"}
    assert not [e for e in events if isinstance(e, DeviceAdded)]

    watch = ProfileWatch(reader.sysfs)
    assert watched(state, watch) == []  # the first pass learns the lists
    vf = H100.vf_address(1)
    mark = len(builder.testbed.uevents)
    builder.set_profile(vf, "1061")  # another tool: no uevent
    assert len(builder.testbed.uevents) == mark
    events = watched(state, watch)
    added = [e for e in events if isinstance(e, DeviceAdded)]
    assert [(e.device.device_id, e.device.parent, e.device.type_id) for e in added] == [
        (vf, H100.address, "1061")
    ]
    # The card is homogeneous now: only 1061 fits beside it, on the three free VFs; the others
    # stay known, with no room.
    assert {k[1]: t.available_instances for k, t in state.types.items()} == {
        "1060": 0,
        "1061": 3,
        "1062": 0,
        "1070": 0,
    }
    # The same profiles with other counts: registered again (the room for a probe changed).
    assert {type(e) for e in events} == {ParentRegistered, DeviceAdded}
    assert watched(state, watch) == []  # nothing changed since

    builder.set_profile(vf, "0")
    events = watched(state, watch)
    assert {type(e) for e in events} == {DeviceRemoved, ParentRegistered}
    assert {k[1]: t.available_instances for k, t in state.types.items()} == {
        "1060": 4,
        "1061": 4,
        "1062": 4,
        "1070": 4,
    }

    mark = len(builder.testbed.uevents)
    builder.disable_vfs("h100")
    events = [e for u in recorded_uevents(builder, mark) for e in state.apply(u)]
    assert [type(e) for e in events][-1] is ParentUnregistered
    assert H100.address not in state.parents
    assert not state.types
    assert not state.vf_parents


def test_a_variant_vf_rebound_to_its_host_driver_goes_and_comes_back(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "mlx5")
    reader = reader_for(builder)
    state = HostState(reader)
    state.resync(reader.host())
    vf = MLX5.vf_address(0)
    assert vf in state.devices
    mark = len(builder.testbed.uevents)
    builder.rebind_vf(vf, "mlx5_core", "mlx5_core")
    events = [e for u in recorded_uevents(builder, mark) for e in state.apply(u)]
    assert [(type(e), e.device.device_id) for e in events] == [(DeviceRemoved, vf)]  # type: ignore[union-attr]
    mark = len(builder.testbed.uevents)
    builder.rebind_vf(vf, "mlx5_vfio_pci", "mlx5_vfio_pci")
    events = [e for u in recorded_uevents(builder, mark) for e in state.apply(u)]
    assert [(type(e), e.device.device_id) for e in events] == [(DeviceAdded, vf)]  # type: ignore[union-attr]
    assert state.devices[vf].parent_version.endswith(" fw 28.39.1002")


# ---- setting and clearing a profile ----------------------------------------------------------


def setter_for(
    builder: SriovHostBuilder, tmp_path: Path, held: set[str] | None = None
) -> tuple[ProfileSetter, ProfileLedger]:
    ledger = ProfileLedger(tmp_path / "run" / "profiles", boot_id_file(tmp_path))
    busy = held or set()
    setter = ProfileSetter(
        reader_for(builder),
        ledger,
        tmp_path / "dev",
        held=lambda _dev, group: group in busy,
        write_seconds=5.0,
    )
    return setter, ledger


def test_a_profile_is_recorded_set_and_cleared_on_a_free_vf(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100")
    parent = reader_for(builder).host().parents[H100.address]
    setter, ledger = setter_for(builder, tmp_path)
    record = setter.reserve(parent, "1062")
    assert record.function == H100.vf_address(0)
    written = json.loads((ledger.directory / f"{record.function}.json").read_text())
    assert written == {
        "function": record.function,
        "profile": "1062",
        "parent": H100.address,
        "boot_id": BOOT,
        "pid": str(os.getpid()),
        "started": process_start(os.getpid()),
        "stamp": "",
    }
    asyncio.run(setter.apply(record))
    builder.answer_writes()
    assert builder.current_profile(record.function) == "1062"
    assert asyncio.run(setter.clear(record.function)) is True
    builder.answer_writes()
    assert builder.current_profile(record.function) == "0"
    assert ledger.records() == []


def test_a_vf_a_vm_holds_is_never_chosen_nor_cleared(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100")
    vm_vf, other = H100.vf_address(0), H100.vf_address(1)
    builder.set_profile(vm_vf, "1060")  # a VM's VF
    parent = reader_for(builder).host().parents[H100.address]
    setter, ledger = setter_for(builder, tmp_path, held={builder.groups[other]})
    record = setter.reserve(parent, "1060")
    assert record.function not in (vm_vf, other)  # one has a profile, one is held
    # A record naming the VM's VF (as a crash could leave) never clears it while it is held.
    ledger.add(ProfileRecord(vm_vf, "1060", H100.address, BOOT))
    setter_held, _ = setter_for(builder, tmp_path, held={builder.groups[vm_vf]})
    assert asyncio.run(setter_held.clear(vm_vf)) is False
    builder.answer_writes()
    assert builder.current_profile(vm_vf) == "1060"
    assert vm_vf in ledger.functions()  # kept, to be cleared at a later start once free
    all_held = {builder.groups[H100.vf_address(i)] for i in range(4)}
    nobody_free = setter_for(builder, tmp_path, held=all_held)[0]
    with pytest.raises(ProfileError, match="no free virtual function"):
        nobody_free.reserve(parent, "1060")


def test_a_crash_leftover_is_cleared_at_start_and_an_old_boot_is_dropped(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100")
    left, other_boot = H100.vf_address(2), H100.vf_address(3)
    builder.set_profile(left, "1060")
    builder.set_profile(other_boot, "1060")
    setter, ledger = setter_for(builder, tmp_path)
    ledger.add(ProfileRecord(left, "1060", H100.address, BOOT))
    ledger.add(ProfileRecord(other_boot, "1060", H100.address, "an-earlier-boot"))
    (ledger.directory / "0000:41:00.6.json.bak").write_text("ignored")
    (ledger.directory / "0000:41:00.5.json").write_text('{"function": "../../etc"}')
    cleared = asyncio.run(setter.recover())
    builder.answer_writes()
    assert cleared == [left]
    assert builder.current_profile(left) == "0"
    # An earlier boot's profile is the administrator's now: left alone, record dropped.
    assert builder.current_profile(other_boot) == "1060"
    assert ledger.records() == []
    assert not (ledger.directory / "0000:41:00.5.json").exists()  # malformed: discarded


def test_a_probe_target_is_read_with_discoverys_reader(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100", "mlx5")
    devices = builder.sys / "bus" / "pci" / "devices"
    target = ProbeTarget.from_sysfs(devices / MLX5.vf_address(0), builder.sys, builder.modules_root)
    assert (target.kind, target.device_id, target.type_id) == (
        DeviceKind.PCI,
        MLX5.vf_address(0),
        "15b3:101e",
    )
    assert target.iommu_group == builder.groups[MLX5.vf_address(0)]
    assert target.parent_driver == "mlx5_vfio_pci"
    free_vf = devices / H100.vf_address(0)
    with pytest.raises(InvalidArgumentError, match="set a vGPU profile"):
        ProbeTarget.from_sysfs(free_vf, builder.sys, builder.modules_root)
    builder.set_profile(H100.vf_address(0), "1060")
    target = ProbeTarget.from_sysfs(free_vf, builder.sys, builder.modules_root)
    assert (target.type_id, target.parent_driver) == ("1060", "nvidia")
    with pytest.raises(InvalidArgumentError):
        ProbeTarget.from_sysfs(tmp_path, builder.sys, builder.modules_root)  # outside the tree


def test_without_a_readable_boot_id_the_runtime_directory_ties_records_to_the_boot(
    tmp_path: Path,
) -> None:
    builder = make_host(tmp_path, "h100")
    parent = reader_for(builder).host().parents[H100.address]
    hidden = tmp_path / "no-proc-sys" / "boot_id"  # as under ProcSubset=pid
    ledger = ProfileLedger(tmp_path / "run" / "profiles", hidden)
    setter = ProfileSetter(reader_for(builder), ledger, tmp_path / "dev", held=lambda _d, _g: False)
    record = setter.reserve(parent, "1060")
    assert record.boot_id == UNKNOWN_BOOT
    asyncio.run(setter.apply(record))
    builder.answer_writes()
    # A daemon killed here is restarted with the same runtime directory: cleared at start.
    restarted = ProfileSetter(
        reader_for(builder),
        ProfileLedger(ledger.directory, hidden),
        tmp_path / "dev",
        held=lambda _d, _g: False,
    )
    assert asyncio.run(restarted.recover()) == [record.function]
    builder.answer_writes()
    assert builder.current_profile(record.function) == "0"


def test_a_read_only_sysfs_says_what_the_service_needs() -> None:
    import errno

    from vfiocaps.discovery.attributes import open_problem

    assert "ReadWritePaths=/sys/devices" in open_problem(OSError(errno.EROFS, "ro"))


async def test_discovery_sees_its_own_profile_writes_without_any_uevent(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100")
    nodes = tmp_path / "dev" / "vfio"
    nodes.mkdir(parents=True)
    for group in builder.groups.values():
        (nodes / group).write_text("")
    config = Config(
        sysfs_root=builder.sys,
        modules_root=builder.modules_root,
        kernel_release=RELEASE,
        runtime_dir=tmp_path / "run",
        dev_root=tmp_path / "dev",
    )
    discovery = Discovery(config, boot_id_path=boot_id_file(tmp_path))
    try:
        parent = (await discovery.start()).parents[H100.address]
        batches = discovery.events()
        function = discovery.create_instance(parent, "1061")
        # The DirectoryTestbed sends no uevent: what follows comes from discovery's re-read.
        batch = await asyncio.wait_for(anext(batches), 10)
        added = [e.device for e in batch if isinstance(e, DeviceAdded)]
        assert [(d.device_id, d.type_id) for d in added] == [(function, "1061")]
        assert builder.current_profile(function) == "1061"
        discovery.remove_instance(added[0])
        batch = await asyncio.wait_for(anext(batches), 10)
        assert [e.device.device_id for e in batch if isinstance(e, DeviceRemoved)] == [function]
        assert builder.current_profile(function) == "0"
        assert not list((tmp_path / "run" / "profiles").glob("*.json"))
    finally:
        await discovery.close()


def test_a_profile_no_vf_lists_keeps_its_name_through_a_re_read(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "h100")
    reader = reader_for(builder)
    state = HostState(reader)
    state.resync(reader.host())
    watch = ProfileWatch(reader.sysfs)
    watched(state, watch)
    vf = H100.vf_address(0)
    builder.set_profile(vf, "1062")  # an 80C fills the GPU: no VF lists any profile now
    watched(state, watch)
    assert reader.host().types[(H100.address, "1062")].name == ""
    assert state.types[(H100.address, "1062")].name == "NVIDIA H100-80C"
    state.resync(reader.host())  # as after lost uevents
    assert state.types[(H100.address, "1062")].name == "NVIDIA H100-80C"


def profile_owned_by(
    builder: SriovHostBuilder, tmp_path: Path, pid: int
) -> tuple[ProfileRecord, ProfileLedger, ProfileSetter]:
    """A profile set for a probe and recorded as set by the vfiocapsd *pid*; the ledger, and the
    setter of another vfiocapsd starting on the same runtime directory."""
    parent = reader_for(builder).host().parents[H100.address]
    setter, ledger = setter_for(builder, tmp_path)
    record = setter.reserve(parent, "1060")
    asyncio.run(setter.apply(record))
    builder.answer_writes()
    path = ledger.directory / f"{record.function}.json"
    written = json.loads(path.read_text())
    path.write_text(json.dumps({**written, "pid": str(pid), "started": process_start(pid)}))
    other = ProfileSetter(
        reader_for(builder),
        ProfileLedger(ledger.directory, boot_id_file(tmp_path)),
        tmp_path / "dev",
        held=lambda _d, _g: False,
    )
    return record, ledger, other


def test_a_running_daemons_profile_is_left_to_it_by_a_second_daemon(tmp_path: Path) -> None:
    """A second vfiocapsd starting (before it knows it will not get the name) must not clear
    the profile a running one has set for its probe; once that daemon is gone, it is cleared."""
    builder = make_host(tmp_path, "h100")
    running = subprocess.Popen(["sleep", "60"])  # stands for the first daemon
    try:
        record, ledger, second = profile_owned_by(builder, tmp_path, running.pid)
        assert asyncio.run(second.recover()) == []
        builder.answer_writes()
        assert builder.current_profile(record.function) == "1060"
        assert ledger.functions() == {record.function}
    finally:
        running.kill()
        running.wait()
    assert asyncio.run(second.recover()) == [record.function]
    builder.answer_writes()
    assert builder.current_profile(record.function) == "0"


def test_a_dead_daemons_profile_is_cleared_though_its_pid_was_reused(tmp_path: Path) -> None:
    """The daemon that set the profile died and another process got its pid: its owner lock,
    not the pid, tells that the profile is left over."""
    builder = make_host(tmp_path, "h100")
    reuser = subprocess.Popen(["sleep", "60"])  # has the dead daemon's pid now
    try:
        record, ledger, restarted = profile_owned_by(builder, tmp_path, reuser.pid)
        (ledger.directory / f"{reuser.pid}.owner").write_text("")  # left unlocked by the dead
        assert asyncio.run(restarted.recover()) == [record.function]
        builder.answer_writes()
        assert builder.current_profile(record.function) == "0"
    finally:
        reuser.kill()
        reuser.wait()
