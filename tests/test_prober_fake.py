"""The real prober against the fake QEMU (real QMP) for device behaviours that cannot exist here."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from support.prober import (
    PROPERTIES_ASKED,
    VERSION_ASKED,
    FakeHost,
    counting_qemu,
    fake_host,
    install_fake_qemu,
    leftovers,
    make_readable,
    node_state,
    probe_user,
    probe_with_fake_qemu,
    scratch,
)
from vfiocaps.capabilities import Display, Migration, ProbeOutcome
from vfiocaps.config import Config
from vfiocaps.model import Device, DeviceKind, DriverIdentity
from vfiocaps.prober import LaunchEvent, LaunchStage, Prober, ProbeTarget

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

UUIDS = {
    "mtty": "11111111-2222-4333-8444-000000000001",
    "mdpy": "11111111-2222-4333-8444-000000000002",
    "mbochs": "11111111-2222-4333-8444-000000000003",
    "gvt": "11111111-2222-4333-8444-000000000004",
    "nvidia": "11111111-2222-4333-8444-000000000005",
}
KVM_USABLE = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


async def test_mtty_has_no_display_and_migrates_without_device_dirty_tracking(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["mtty"], "mtty-1", "mtty", "0")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device)
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert caps.display is Display.NONE
    assert caps.gl_required is False
    # With QEMU's defaults (what libvirt starts) the save fails; with the options it round-trips.
    assert caps.migration is Migration.UNSUPPORTED
    assert caps.migration_blockers == ("ram_save_setup failed: Operation not supported",)
    assert caps.migration_with_options is Migration.SUPPORTED
    assert caps.migration_options == (
        ("x-device-dirty-page-tracking", "off"),
        ("enable-migration", "on"),
    )
    assert any("x-device-dirty-page-tracking=off" in note for note in caps.migration_notes)
    assert caps.migration_state_bytes == 60
    assert caps.qemu_version == "10.0.13"
    assert [launch.purpose for launch in report.launches] == ["discover", "tracking-off", "load"]
    retry = report.launches[1].argv
    device_arg = retry[retry.index("-device") + 1]
    assert "x-device-dirty-page-tracking=off" in device_arg
    assert "enable-migration=on" in device_arg


async def test_mdpy_has_a_region_display_and_does_not_migrate(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["mdpy"], "mdpy-vga", "mdpy", "1", parent="mdpy")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device)
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert (caps.display, caps.gl_required, caps.migration) == (
        Display.REGION,
        False,
        Migration.UNSUPPORTED,
    )
    assert caps.migration_blockers == (
        f"{UUIDS['mdpy']}: VFIO migration is not supported in kernel",
    )
    assert len(report.launches) == 1


async def test_mbochs_needs_gl_for_its_dmabuf_display_and_does_not_migrate(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["mbochs"], "mbochs-small", "mbochs", "2", parent="mbochs")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device)
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert (caps.display, caps.gl_required, caps.migration) == (
        Display.DMABUF,
        True,
        Migration.UNSUPPORTED,
    )
    assert [launch.purpose for launch in report.launches] == ["discover", "display-off"]


async def test_gvt_g_without_kvm_is_no_kvm(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["gvt"], "i915-GVTg_V5_4", "vfio_mdev", "3", parent="i915")
    report = await probe_with_fake_qemu(
        scratch, fake_host, probe_user, device
    )  # no kvm node in this tree
    assert report.outcome is ProbeOutcome.NO_KVM, report
    assert "KVM is required to use Intel vGPU" in report.error
    assert any("probing with TCG" in note for note in report.notes)


@pytest.mark.skipif(not KVM_USABLE, reason="needs a usable /dev/kvm")
async def test_gvt_g_with_kvm_is_probed(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    fake_host.link_kvm()
    kvm_before = node_state(Path("/dev/kvm"))
    device = fake_host.add_mdev(UUIDS["gvt"], "i915-GVTg_V5_4", "vfio_mdev", "3", parent="i915")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device)
    assert report.outcome is ProbeOutcome.OK, report
    assert report.capabilities is not None
    assert report.capabilities.display is Display.DMABUF
    assert "accel=kvm" in " ".join(report.launches[0].argv)
    assert node_state(Path("/dev/kvm")) == kvm_before


async def test_nvidia_gets_a_vm_uuid_and_migrates_with_its_own_dirty_tracking(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["nvidia"], "nvidia-63", "nvidia-vgpu-vfio", "4", "nvidia")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device)
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert (caps.display, caps.migration) == (Display.NONE, Migration.SUPPORTED)
    assert caps.migration_with_options is Migration.SUPPORTED
    assert caps.migration_options == ()
    assert not any("dirty-page-tracking" in note for note in caps.migration_notes)
    assert [launch.purpose for launch in report.launches] == ["discover", "load"]
    assert all("-uuid" in launch.argv for launch in report.launches)


def test_fake_nvidia_refuses_without_a_vm_uuid(scratch: Path, fake_host: FakeHost) -> None:
    """The stand-in enforces what NVIDIA's manager needs, so the -uuid in the plan matters."""
    device = fake_host.add_mdev(UUIDS["nvidia"], "nvidia-63", "nvidia-vgpu-vfio", "4", "nvidia")
    qemu = install_fake_qemu(scratch / "qemu")
    parent, child = socket.socketpair()
    with parent, child:
        result = subprocess.run(
            [
                str(qemu),
                "-S",
                "-chardev",
                f"socket,id=m,fd={child.fileno()}",
                "-mon",
                "chardev=m,mode=control",
                "-device",
                f"vfio-pci,sysfsdev={device},display=off",
            ],
            pass_fds=[child.fileno()],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "Failed to get VM UUID from QEMU command-line" in result.stderr


async def test_a_busy_device_is_reported_busy(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["mtty"], "mtty-1", "mtty", "0")
    overrides = {"devices": {UUIDS["mtty"]: {"busy": True}}}
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device, overrides)
    assert report.outcome is ProbeOutcome.BUSY, report
    assert "Device or resource busy" in report.error
    assert len(report.launches) == 1


async def test_an_unknown_device_failure_keeps_the_stderr_excerpt(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["mtty"], "unknown-1", "unknown", "0", parent="unknown")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device)
    assert report.outcome is ProbeOutcome.FAILED, report
    assert "exited with status 1" in report.error
    assert "failed to get device info" in report.stderr_excerpt


async def test_overrides_change_a_profile(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UUIDS["mtty"], "mtty-1", "mtty", "0")
    overrides = {"devices": {UUIDS["mtty"]: {"profile": "mdpy"}}}
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device, overrides)
    assert report.capabilities is not None
    assert report.capabilities.display is Display.REGION


@pytest.mark.skipif(os.geteuid() != 0, reason="granting device nodes needs root")
async def test_group_node_is_granted_for_the_probe_and_restored_exactly(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    import pwd

    device = fake_host.add_mdev(UUIDS["mdpy"], "mdpy-vga", "mdpy", "9", parent="mdpy")
    node = fake_host.dev / "vfio" / "9"
    os.chown(node, 0, 6)  # an unusual group and mode, to see them restored exactly
    node.chmod(0o640)
    before = node_state(node)
    during: list[tuple[int, int, int]] = []

    def watch(event: LaunchEvent) -> None:
        if event.stage is LaunchStage.QMP_READY:
            during.append(node_state(node))

    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device, observer=watch)
    assert report.outcome is ProbeOutcome.OK, report
    uid = pwd.getpwnam(probe_user).pw_uid
    assert during == [(uid, 6, 0o640)]
    assert node_state(node) == before


async def test_target_from_a_discovered_device(fake_host: FakeHost) -> None:
    path = fake_host.add_mdev(UUIDS["mtty"], "mtty-2", "mtty", "5")
    driver = DriverIdentity("mtty", "0.1", "module-version", "6.12.0")
    device = Device(
        DeviceKind.MDEV, UUIDS["mtty"], path, "mtty", "mtty-2", driver=driver, iommu_group="5"
    )
    target = ProbeTarget.from_device(device)
    assert target == ProbeTarget.from_sysfs(path, fake_host.sysfs)
    assert target.parent_driver == "mtty"
    assert target.qemu_name == UUIDS["mtty"]


async def test_fake_identifies_as_qemu_10_and_passes_the_bare_check(
    scratch: Path, probe_user: str
) -> None:
    qemu = install_fake_qemu(scratch / "qemu")
    make_readable(scratch)
    prober = Prober(Config(runtime_dir=scratch / "run", qemu_binary=qemu, probe_user=probe_user))
    identity = await prober.read_qemu_properties(await prober.read_qemu())
    assert identity.version == "10.0.13"
    assert identity.vfio_pci_properties is not None
    assert {"enable-migration", "x-device-dirty-page-tracking"} <= identity.vfio_pci_properties
    report = await prober.check_qemu(identity)
    assert report.outcome is ProbeOutcome.OK, report
    assert [launch.purpose for launch in report.launches] == ["bare"]
    assert leftovers(scratch / "run") == []


async def test_the_identity_costs_one_short_qemu_start_and_a_probe_handed_it_none(
    scratch: Path, probe_user: str
) -> None:
    """Reading the identity asks -version only; the vfio-pci properties are one more short
    start; a probe handed the completed identity (as the engine hands it) asks neither again."""
    binary, calls = counting_qemu(scratch)
    config = Config(
        qemu_binary=binary,
        probe_user=probe_user,
        runtime_dir=scratch / "run",
        cache_dir=scratch / "cache",
    )
    prober = Prober(config)
    identity = await prober.read_qemu()
    assert identity.vfio_pci_properties is None
    assert calls.read_text().splitlines() == [VERSION_ASKED]
    identity = await prober.read_qemu_properties(identity)
    assert identity.vfio_pci_properties
    assert calls.read_text().splitlines() == [VERSION_ASKED, PROPERTIES_ASKED]
    report = await prober.check_qemu(identity)
    assert report.outcome is ProbeOutcome.OK, report
    later = calls.read_text().splitlines()[2:]
    assert later, "the self-test launched QEMU"
    assert not [line for line in later if line in (VERSION_ASKED, PROPERTIES_ASKED)]


async def test_a_probe_handed_an_identity_without_properties_asks_them_and_uses_them(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    """The engine hands a probe the version alone when the properties could not be asked: the
    probe asks them (one short start) and its answer rests on them (the mtty retry with
    x-device-dirty-page-tracking=off exists only when QEMU has that property)."""
    binary, calls = counting_qemu(scratch)
    device = fake_host.add_mdev(UUIDS["mtty"], "mtty-1", "mtty", "0")
    make_readable(scratch)
    prober = Prober(
        Config(
            sysfs_root=fake_host.sysfs,
            dev_root=fake_host.dev,
            runtime_dir=scratch / "run",
            qemu_binary=binary,
            probe_user=probe_user,
            probe_timeout=20.0,
        )
    )
    identity = await prober.read_qemu()
    report = await prober.probe(ProbeTarget.from_sysfs(device, fake_host.sysfs), identity)
    assert report.outcome is ProbeOutcome.OK, report
    assert report.capabilities is not None
    assert report.capabilities.migration_with_options is Migration.SUPPORTED
    asked = calls.read_text().splitlines()
    assert asked[:2] == [VERSION_ASKED, PROPERTIES_ASKED]
    assert asked.count(PROPERTIES_ASKED) == 1
