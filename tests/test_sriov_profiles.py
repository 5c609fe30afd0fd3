"""vGPU profiles of NVIDIA SR-IOV cards, in process on the rebuilt fixtures: the vendor driver's
refusals as named errors, MIG-backed profiles, and a profile's identity across card models
(cache keys and NFD labels by profile name, not by the per-model id)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from support.engine_rig import driver
from support.umockdev_hosts import DirectoryTestbed
from support.umockdev_sriov import H100, L40S, SriovHostBuilder
from vfiocaps.bus.errors import ERROR_PREFIX, to_dbus_error
from vfiocaps.capabilities import Capabilities, Display, Migration
from vfiocaps.discovery.functions import mig_backed
from vfiocaps.discovery.identity import IdentityResolver, ModuleFiles
from vfiocaps.discovery.profiles import ProfileError, refusal
from vfiocaps.discovery.scan import HostReader
from vfiocaps.discovery.sysfs import SysfsTree
from vfiocaps.engine import TypeView
from vfiocaps.engine.keys import key_for, make_key, type_identity
from vfiocaps.errors import (
    ProfileConflictError,
    ProfileInUseError,
    ProfileNoRoomError,
    ProfileNotPermittedError,
    ProfileUnknownError,
)
from vfiocaps.model import NEEDS_GPU_INSTANCE, TypeKind
from vfiocaps.nfdlabels import LABEL_PREFIX, labels_of
from vfiocaps.qemubinary import QemuBinary

RELEASE = "6.12.0-test"
QEMU = QemuBinary(path="/usr/bin/qemu-system-x86_64", version="10.0.13", ctime_ns=1)
ATTRIBUTE = Path("/sys/devices/pci0000:41/0000:41:01.0/0000:41:00.4/nvidia/current_vgpu_type")


def reader_of(tmp_path: Path, *keys: str) -> tuple[SriovHostBuilder, HostReader]:
    builder = SriovHostBuilder(DirectoryTestbed(tmp_path / "bed"), kernel_release=RELEASE)
    for key in keys:
        builder.build_sriov(key)
    sysfs = SysfsTree(builder.sys)
    files = ModuleFiles(builder.modules_root, RELEASE)
    return builder, HostReader(sysfs, IdentityResolver(sysfs, files))


@pytest.mark.parametrize(
    ("code", "error_class", "dbus_name", "advice"),
    [
        (errno.EBUSY, ProfileInUseError, "ProfileInUse", "close it first"),
        (errno.ENODEV, ProfileUnknownError, "ProfileUnknown", "creatable_vgpu_types"),
        (errno.EINVAL, ProfileConflictError, "ProfileConflict", "one profile at a time"),
        (errno.ENOSPC, ProfileNoRoomError, "ProfileNoRoom", "no room"),
        (errno.EPERM, ProfileNotPermittedError, "ProfileNotPermitted", "a vGPU exists"),
    ],
)
def test_each_refusal_of_the_driver_has_its_own_name_file_and_errno(
    code: int, error_class: type[Exception], dbus_name: str, advice: str
) -> None:
    error = refusal(ATTRIBUTE, "1061", OSError(code, "refused"))
    assert type(error) is error_class
    assert str(ATTRIBUTE) in str(error)
    assert errno.errorcode[code] in str(error)
    assert advice in str(error)
    reply = to_dbus_error(error, "ProbeType")
    assert reply.type == ERROR_PREFIX + dbus_name
    assert str(ATTRIBUTE) in reply.text
    assert errno.errorcode[code] in reply.text


def test_another_errno_is_a_plain_profile_error_that_still_names_it() -> None:
    error = refusal(ATTRIBUTE, "1061", OSError(errno.EIO, "I/O error"))
    assert type(error) is ProfileError
    assert "EIO" in str(error)
    assert str(ATTRIBUTE) in str(error)


def test_a_real_kernel_refusal_through_the_write_path_is_named(tmp_path: Path) -> None:
    """A plain file cannot refuse a write; ``/dev/full`` does, with the kernel's own ENOSPC,
    through the very path a profile write takes (a tree rooted at ``/``)."""
    from vfiocaps.discovery.profiles import _write_attribute

    _, reader = reader_of(tmp_path, "h100")
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is missing")
    root = HostReader(SysfsTree(Path("/")), reader.identities)
    with pytest.raises(ProfileNoRoomError, match="ENOSPC") as raised:
        _write_attribute(root, Path("/dev/full"), "1061")
    assert "/dev/full" in str(raised.value)


def test_mig_backed_profiles_are_named_and_need_a_gpu_instance(tmp_path: Path) -> None:
    assert mig_backed("NVIDIA H100-1-10C")
    assert mig_backed("NVIDIA A100-3-20C")
    assert not mig_backed("NVIDIA H100-20C")
    assert not mig_backed("NVIDIA L40S-1B")
    _, reader = reader_of(tmp_path, "h100")
    types = reader.host().types
    assert types[(H100.address, "1070")].requires == NEEDS_GPU_INSTANCE
    assert types[(H100.address, "1060")].requires == ""


def test_the_same_id_on_two_card_models_is_two_types_with_two_keys_and_labels(
    tmp_path: Path,
) -> None:
    builder, reader = reader_of(tmp_path, "h100", "l40s")
    builder.set_profile(H100.vf_address(0), "1061")
    builder.set_profile(L40S.vf_address(0), "1061")
    snapshot = reader.host()
    h100 = snapshot.types[(H100.address, "1061")]
    l40s = snapshot.types[(L40S.address, "1061")]
    assert (h100.name, l40s.name) == ("NVIDIA H100-40C", "NVIDIA L40S-24Q")
    assert (type_identity(h100), type_identity(l40s)) == ("NVIDIA H100-40C", "NVIDIA L40S-24Q")
    keys = {
        key_for(snapshot.devices[vf], snapshot, RELEASE, QEMU)
        for vf in (H100.vf_address(0), L40S.vf_address(0))
    }
    assert None not in keys
    assert len(keys) == 2
    assert {(k.parent_pci_id, k.type_id) for k in keys if k is not None} == {
        ("10de:2331", "NVIDIA H100-40C"),
        ("10de:26b9", "NVIDIA L40S-24Q"),
    }
    # ProbeType's key of the type is the key of its devices.
    h100_parent = snapshot.parents[H100.address]
    assert h100_parent.driver is not None
    assert (
        make_key(h100_parent.driver, h100_parent.pci_id, type_identity(h100), RELEASE, QEMU) in keys
    )
    supported = Capabilities(display=Display.NONE, gl_required=False, migration=Migration.SUPPORTED)
    unsupported = Capabilities(
        display=Display.NONE, gl_required=False, migration=Migration.UNSUPPORTED
    )
    views = [
        TypeView(
            parent=t.parent,
            type_id=t.type_id,
            name=t.name,
            description="",
            device_api="vfio-pci",
            available_instances=t.available_instances,
            instances=1,
            driver=driver("nvidia"),
            capabilities=caps,
            kind=TypeKind.VF_PROFILE,
        )
        for t, caps in ((h100, supported), (l40s, unsupported))
    ]
    labels = labels_of(views)
    assert labels[f"{LABEL_PREFIX}/NVIDIA-H100-40C.migration"] == "supported"
    assert labels[f"{LABEL_PREFIX}/NVIDIA-L40S-24Q.migration"] == "unsupported"
    assert not any(name.startswith(f"{LABEL_PREFIX}/1061.") for name in labels)
