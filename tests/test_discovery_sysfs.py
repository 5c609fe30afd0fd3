"""Discovery's reads of hostile sysfs trees, the driver version rule, and event bookkeeping."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.umockdev_hosts import MDPY, MTTY, DirectoryTestbed, HostBuilder
from vfiocaps.config import Config
from vfiocaps.discovery import Discovery, DiscoveryState, DiscoveryStateError, read_device
from vfiocaps.discovery.eventlog import format_event, quote_value
from vfiocaps.discovery.identity import IdentityResolver, ModuleFiles
from vfiocaps.discovery.monitor import Uevent
from vfiocaps.discovery.scan import HostReader
from vfiocaps.discovery.state import HostState
from vfiocaps.discovery.sysfs import ATTRIBUTE_LIMIT, SysfsTree
from vfiocaps.model import (
    DeviceAdded,
    DeviceKind,
    DeviceRemoved,
    DriverChanged,
    ParentRegistered,
    ParentUnregistered,
    Resynchronised,
)

RELEASE = "6.12.0-test"


def make_host(tmp_path: Path, host: str = "samples") -> HostBuilder:
    builder = HostBuilder(DirectoryTestbed(tmp_path / "bed"), kernel_release=RELEASE)
    builder.build(host)
    return builder


def config_for(builder: HostBuilder) -> Config:
    return Config(sysfs_root=builder.sys, modules_root=builder.modules_root, kernel_release=RELEASE)


def reader_for(builder: HostBuilder) -> HostReader:
    sysfs = SysfsTree(builder.sys)
    return HostReader(sysfs, IdentityResolver(sysfs, ModuleFiles(builder.modules_root, RELEASE)))


def uevents_of(builder: HostBuilder, start: int = 0) -> list[Uevent]:
    testbed = builder.testbed
    assert isinstance(testbed, DirectoryTestbed)
    return [
        Uevent(
            action=p["ACTION"],
            devpath=p["DEVPATH"],
            subsystem=p["SUBSYSTEM"],
            driver=p.get("DRIVER", ""),
            mdev_state=p.get("MDEV_STATE", ""),
            seqnum=int(p["SEQNUM"]),
        )
        for p in testbed.uevents[start:]
    ]


# ---- SysfsTree ------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    root = tmp_path / "sys"
    root.mkdir()
    return SysfsTree(root)


def test_reads_plain_attributes_and_integers(tree: SysfsTree) -> None:
    (tree.root / "dev").mkdir()
    (tree.root / "dev" / "name").write_text("  Single port serial\n")
    (tree.root / "dev" / "vendor").write_text("0x10de\n")
    (tree.root / "dev" / "count").write_text("24\n")
    assert tree.read_text(tree.root / "dev" / "name") == "Single port serial"
    assert tree.read_int(tree.root / "dev" / "vendor", 16) == 0x10DE
    assert tree.read_int(tree.root / "dev" / "count") == 24


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"x" * (ATTRIBUTE_LIMIT + 1), "longer than"),
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b"abc\0def", "NUL byte"),
    ],
)
def test_hostile_attribute_content_is_skipped_and_logged(
    tree: SysfsTree, content: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tree.root / "attr").write_bytes(content)
    with caplog.at_level(logging.WARNING, "vfiocaps.discovery"):
        assert tree.read_text(tree.root / "attr") is None
    assert reason in caplog.text


def test_an_attribute_of_exactly_the_limit_is_read(tree: SysfsTree) -> None:
    (tree.root / "attr").write_bytes(b"y" * ATTRIBUTE_LIMIT)
    assert tree.read_text(tree.root / "attr") == "y" * ATTRIBUTE_LIMIT


@pytest.mark.parametrize("text", ["", "0x", "12abc", "+5", "1_000", " -1", "9" * 40, "١٢"])
def test_malformed_integers_are_none(tree: SysfsTree, text: str) -> None:
    (tree.root / "attr").write_text(text)
    assert tree.read_int(tree.root / "attr") is None
    assert tree.read_int(tree.root / "attr", 16) is None or text == "12abc"


def test_missing_and_non_regular_attributes_are_none(tree: SysfsTree) -> None:
    (tree.root / "dir").mkdir()
    os.mkfifo(tree.root / "fifo")
    assert tree.read_text(tree.root / "missing") is None
    assert tree.read_text(tree.root / "dir") is None
    assert tree.read_text(tree.root / "fifo") is None  # would block a naive reader
    assert tree.list_dir(tree.root / "missing") == []


def test_symlink_loops_are_skipped(tree: SysfsTree, caplog: pytest.LogCaptureFixture) -> None:
    (tree.root / "a").symlink_to("b")
    (tree.root / "b").symlink_to("a")
    (tree.root / "self").symlink_to("self/x")
    with caplog.at_level(logging.WARNING, "vfiocaps.discovery"):
        assert tree.resolve(tree.root / "a") is None
        assert tree.read_text(tree.root / "a" / "name") is None
        assert tree.link_name(tree.root / "self") is None
        assert tree.list_dir(tree.root / "b") == []
    assert "loop" in caplog.text


def test_links_out_of_the_root_are_never_followed(tmp_path: Path, tree: SysfsTree) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "name").write_text("outside\n")
    (tree.root / "relative").symlink_to("../secret")
    (tree.root / "absolute").symlink_to(secret)
    (tree.root / "dir").mkdir()
    (tree.root / "dir" / "name").symlink_to(secret / "name")
    for link in ("relative", "absolute"):
        assert tree.resolve(tree.root / link) is None
        assert tree.read_text(tree.root / link / "name") is None
        assert tree.list_dir(tree.root / link) == []
    # An attribute that is itself a link is not an attribute.
    assert tree.read_text(tree.root / "dir" / "name") is None
    # A path that is outside to begin with.
    assert tree.read_text(secret / "name") is None
    assert tree.read_text(tree.root / ".." / "secret" / "name") is None


def test_absolute_links_inside_the_root_are_refused_too(tree: SysfsTree) -> None:
    (tree.root / "devices").mkdir()
    (tree.root / "link").symlink_to(tree.root / "devices")
    assert tree.resolve(tree.root / "link") is None


# ---- reading parents and devices ------------------------------------------------------------


def test_reads_the_sample_host(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    uuid = builder.add_instance("mdpy", "mdpy-hd")
    snapshot = reader_for(builder).host()
    assert sorted(snapshot.parents) == ["mbochs", "mdpy", "mtty"]
    mtty = snapshot.parents["mtty"]
    assert mtty.subsystem == "mtty"
    assert mtty.pci_id == ""
    assert mtty.driver is not None
    assert (mtty.driver.module, mtty.driver.version, mtty.driver.version_source) == (
        "mtty",
        "0.1",
        "module-version",
    )
    assert snapshot.types[("mtty", "mtty-1")].available_instances == 24
    assert snapshot.types[("mtty", "mtty-1")].name == "Single port serial"
    assert snapshot.types[("mdpy", "mdpy-hd")].available_instances == 3
    assert snapshot.types[("mbochs", "mbochs-small")].description.startswith("virtual display")
    device = snapshot.devices[uuid]
    assert device.kind is DeviceKind.MDEV
    assert (device.parent, device.type_id, device.type_name) == ("mdpy", "mdpy-hd", "hd")
    assert device.iommu_group == "0"
    assert device.driver == snapshot.parents["mdpy"].driver


def test_read_device_answers_for_vfio_devices_only(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    builder.build("pci")
    uuid = builder.add_instance("mtty", "mtty-1")
    config = config_for(builder)
    mdev = read_device(config, builder.sys / "bus" / "mdev" / "devices" / uuid)
    assert mdev is not None
    assert mdev.device_id == uuid
    vfio = read_device(config, builder.sys / "bus" / "pci" / "devices" / "0000:65:00.4")
    assert vfio is not None
    assert (vfio.kind, vfio.type_id) == (DeviceKind.PCI, "8086:1520")
    assert vfio.driver is not None
    assert vfio.driver.module == "vfio_pci"
    assert read_device(config, builder.sys / "bus" / "pci" / "devices" / "0000:66:00.0") is None
    assert read_device(config, builder.sys / "devices" / "virtual" / "mtty" / "mtty") is None
    assert read_device(config, builder.sys / "bus" / "mdev" / "devices" / "nonexistent") is None
    assert read_device(config, tmp_path) is None  # outside the sysfs root


def test_an_unbound_mdev_is_not_a_device(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    uuid = builder.add_instance("mtty", "mtty-2")
    (builder.sys / "bus" / "mdev" / "devices" / uuid / "driver").unlink()
    assert read_device(config_for(builder), builder.sys / "bus" / "mdev" / "devices" / uuid) is None


def test_hostile_parent_content_skips_only_what_is_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    builder = make_host(tmp_path)
    types = builder.at(MTTY.devpath) / "mdev_supported_types"
    (types / "mtty-1" / "available_instances").write_bytes(b"\xff\xff")
    (types / "mtty-2" / "name").write_bytes(b"A" * 100_000)
    uuid = builder.add_instance("mbochs", "mbochs-small")
    # An instance whose type link leaves the tree.
    evil = builder.add_instance("mdpy", "mdpy-vga")
    link = builder.at(MDPY.devpath) / evil / "mdev_type"
    link.unlink()
    link.symlink_to("../../../../../../../../../../../../../../etc")
    # A parent whose types directory is a link loop.
    shutil.rmtree(builder.at(MDPY.devpath) / "mdev_supported_types")
    (builder.at(MDPY.devpath) / "mdev_supported_types").symlink_to("mdev_supported_types")
    with caplog.at_level(logging.WARNING, "vfiocaps.discovery"):
        snapshot = reader_for(builder).host()
    assert ("mtty", "mtty-1") not in snapshot.types  # malformed count: the type is skipped
    assert snapshot.types[("mtty", "mtty-2")].name == ""  # oversized name: empty
    assert "mdpy" not in snapshot.parents
    assert evil not in snapshot.devices
    assert uuid in snapshot.devices
    assert "not UTF-8" in caplog.text
    assert "longer than" in caplog.text


class VanishingTree(SysfsTree):
    """A tree whose device directory disappears after its first attribute is read: a device
    removed by the kernel while discovery reads it."""

    def __init__(self, root: Path, victim: Path) -> None:
        super().__init__(root)
        self.victim = victim

    def read_attribute(
        self, directory: Path, name: str, limit: int = ATTRIBUTE_LIMIT
    ) -> str | None:
        value = super().read_attribute(directory, name, limit)
        if self.victim.exists():
            shutil.rmtree(self.victim)
        return value


def test_a_device_that_vanishes_mid_read_is_skipped(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    builder.build("pci")
    victim = builder.sys / "devices" / "pci0000:65" / "0000:65:01.0" / "0000:65:00.4"
    sysfs = VanishingTree(builder.sys, victim)
    reader = HostReader(sysfs, IdentityResolver(sysfs, ModuleFiles(builder.modules_root, RELEASE)))
    assert reader.read_device_path(victim) is None
    assert "0000:65:00.4" not in reader.host().devices


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.binary(max_size=200)),
        min_size=1,
        max_size=8,
    )
)
def test_any_attribute_content_never_crashes_a_full_read(
    tmp_path_factory: pytest.TempPathFactory, garbage: list[tuple[int, bytes]]
) -> None:
    builder = make_host(tmp_path_factory.mktemp("fuzz"))
    builder.add_instance("mtty", "mtty-1")
    attributes = sorted(p for p in builder.sys.rglob("*") if p.is_file() and not p.is_symlink())
    for index, content in garbage:
        attributes[index % len(attributes)].write_bytes(content)
    snapshot = reader_for(builder).host()
    assert set(snapshot.parents) <= {"mtty", "mdpy", "mbochs"}


# ---- the driver version rule ----------------------------------------------------------------


def test_version_rule_order(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    identities = reader_for(builder).identities
    module_dir = builder.sys / "module" / "mtty"
    assert identities.identify("mtty") is not None
    assert identities.identify("mtty").version_source == "module-version"  # type: ignore[union-attr]
    (module_dir / "version").unlink()
    srcversion = (module_dir / "srcversion").read_text().strip()
    identity = identities.identify("mtty")
    assert identity is not None
    assert (identity.version, identity.version_source) == (srcversion, "srcversion")
    (module_dir / "srcversion").unlink()
    module_file = builder.modules_root / RELEASE / MTTY.module_file
    identity = identities.identify("mtty")
    assert identity is not None
    assert identity.version_source == "module-file"
    assert identity.version == "sha256:" + hashlib.sha256(module_file.read_bytes()).hexdigest()
    # A file that cannot be read: its size and time.
    module_file.unlink()
    module_file.mkdir()
    identity = reader_for(builder).identities.identify("mtty")
    assert identity is not None
    info = module_file.stat()
    assert identity.version == f"stat:{info.st_size}:{info.st_mtime_ns}"
    # No file listed at all: the kernel release, said as such.
    (builder.modules_root / RELEASE / "modules.dep").write_text("")
    identity = reader_for(builder).identities.identify("mtty")
    assert identity is not None
    assert (identity.version, identity.version_source) == (RELEASE, "kernel")
    # Built in (no initstate): the kernel release.
    (module_dir / "initstate").unlink()
    identity = reader_for(builder).identities.identify("mtty")
    assert identity is not None
    assert (identity.version, identity.version_source) == (RELEASE, "kernel")
    assert reader_for(builder).identities.identify("not_loaded") is None
    assert reader_for(builder).identities.identify("../etc") is None


def test_modules_dep_cannot_point_outside_the_modules_directory(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    (builder.sys / "module" / "mtty" / "version").unlink()
    (builder.sys / "module" / "mtty" / "srcversion").unlink()
    (builder.modules_root / RELEASE / "modules.dep").write_text(
        "../../../../etc/mtty.ko: \n/etc/mtty.ko:\n"
    )
    identity = reader_for(builder).identities.identify("mtty")
    assert identity is not None
    assert identity.version_source == "kernel"


# ---- from uevents to domain events ----------------------------------------------------------


def test_kernel_sequences_become_domain_events(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "mtty")
    state = HostState(reader_for(builder))
    coldplug = state.resync(reader_for(builder).host())
    assert [type(e) for e in coldplug] == [ParentRegistered, Resynchronised]
    mark = len(builder.testbed.uevents)
    uuid = builder.add_instance("mtty", "mtty-1")
    events = [e for u in uevents_of(builder, mark) for e in state.apply(u)]
    assert [type(e) for e in events] == [DeviceAdded]
    assert state.types[("mtty", "mtty-1")].available_instances == 23
    mark = len(builder.testbed.uevents)
    builder.reload_module("mtty", "0.2")
    events = [e for u in uevents_of(builder, mark) for e in state.apply(u)]
    assert [type(e) for e in events] == [
        DeviceRemoved,
        ParentUnregistered,
        DriverChanged,
        ParentRegistered,
    ]
    assert events[0].device.device_id == uuid  # type: ignore[union-attr]
    changed = events[2]
    assert isinstance(changed, DriverChanged)
    assert changed.old is not None
    assert changed.new is not None
    assert (changed.module, changed.old.version, changed.new.version) == ("mtty", "0.1", "0.2")


def test_late_events_do_not_resurrect_what_is_gone(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "mtty")
    state = HostState(reader_for(builder))
    state.resync(reader_for(builder).host())
    mark = len(builder.testbed.uevents)
    uuid = builder.add_instance("mtty", "mtty-1")
    builder.remove_instance(uuid)
    # Everything is processed only now, when the instance is already gone from sysfs.
    events = [e for u in uevents_of(builder, mark) for e in state.apply(u)]
    assert events == []
    assert uuid not in state.devices


def test_resync_reports_the_difference(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    reader = reader_for(builder)
    state = HostState(reader)
    state.resync(reader.host())
    kept = builder.add_instance("mbochs", "mbochs-small")
    state.resync(reader.host())
    gone = builder.add_instance("mtty", "mtty-1")
    state.resync(reader.host())
    # Changes nobody was told about (as after a lost-events overflow).
    builder.remove_instance(gone)
    builder.reload_module("mdpy")
    builder.unload_module("mtty")
    new = builder.add_instance("mbochs", "mbochs-large")
    events = state.resync(reader.host())
    kinds = [
        (type(e).__name__, getattr(getattr(e, "device", None), "device_id", None)) for e in events
    ]
    assert kinds == [
        ("DeviceRemoved", gone),
        ("ParentUnregistered", None),
        ("DriverChanged", None),  # mdpy: the same parent, now served by another build
        ("DeviceAdded", new),
        ("Resynchronised", None),
    ]
    assert kept in state.devices
    assert "mtty" not in state.parents


def test_event_lines_are_stable_and_quoted(tmp_path: Path) -> None:
    builder = make_host(tmp_path, "mtty")
    snapshot = reader_for(builder).host()
    parent = snapshot.parents["mtty"]
    types = tuple(t for t in snapshot.types.values())
    line = format_event(ParentRegistered(parent, types))
    assert line == (
        "event ParentRegistered parent=mtty subsystem=mtty pci=- driver=mtty version=0.1 "
        "source=module-version types=mtty-1,mtty-2"
    )
    assert quote_value("a b\nc=d") == "a%20b%0Ac%3Dd"
    assert quote_value("") == "-"
    assert quote_value("é") == "%C3%A9"


# ---- the service's life cycle -----------------------------------------------------------------


async def test_discovery_life_cycle(tmp_path: Path) -> None:
    builder = make_host(tmp_path)
    uuid = builder.add_instance("mbochs", "mbochs-medium")
    discovery = Discovery(config_for(builder))
    with pytest.raises(DiscoveryStateError):
        async for _ in discovery.events():
            pass
    snapshot = await discovery.start()
    assert snapshot is discovery.snapshot
    assert sorted(snapshot.parents) == ["mbochs", "mdpy", "mtty"]
    assert list(snapshot.devices) == [uuid]
    assert discovery.state is DiscoveryState.RUNNING
    with pytest.raises(DiscoveryStateError):
        await discovery.start()
    batches = discovery.events()
    # What start() returned is not reported again: nothing has changed since, so no batch.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(batches), 0.3)
    await discovery.close()
    await discovery.close()
    assert discovery.state is DiscoveryState.CLOSED
    with pytest.raises(StopAsyncIteration):
        await anext(batches)
    assert [b async for b in discovery.events()] == []
