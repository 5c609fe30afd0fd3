"""The QEMU command line builder and the known-message table, alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfiocaps.prober import Accel, DeviceSettings, OnOffAuto, ProbePlan, build_qemu_argv
from vfiocaps.prober.messages import KNOWN_MESSAGES, Meaning, excerpt, first_failure
from vfiocaps.prober.plan import (
    UnsupportedArchitectureError,
    device_option,
    machine_for_architecture,
)

QEMU = Path("/usr/bin/qemu-system-x86_64")
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
VM_UUID = "5f0c7a52-3b8e-4d0f-9d63-2f1e7c9a4b10"


def option_after(argv: tuple[str, ...], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_bare_plan_is_a_paused_sandboxed_machine_with_qmp_on_the_fd() -> None:
    argv = build_qemu_argv(QEMU, ProbePlan("q35", Accel.KVM, VM_UUID, qmp_fd=7))
    assert argv[0] == str(QEMU)
    for flag in ("-S", "-nodefaults", "-no-user-config"):
        assert flag in argv
    assert option_after(argv, "-display") == ["none"]
    assert option_after(argv, "-nic") == ["none"]
    assert option_after(argv, "-machine") == ["q35,accel=kvm"]
    assert option_after(argv, "-uuid") == [VM_UUID]
    assert option_after(argv, "-chardev") == ["socket,id=vfiocaps-qmp,fd=7"]
    assert option_after(argv, "-mon") == ["chardev=vfiocaps-qmp,mode=control"]
    assert option_after(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert "-device" not in argv
    assert not any("path=" in arg or "-run-with" in arg or "-runas" in arg for arg in argv)
    assert int(option_after(argv, "-m")[0]) <= 128


def test_device_option_carries_every_setting() -> None:
    plan = ProbePlan(
        "q35",
        Accel.TCG,
        VM_UUID,
        qmp_fd=3,
        sysfsdev=Path(f"/sys/bus/mdev/devices/{UUID}"),
        settings=DeviceSettings(OnOffAuto.OFF, OnOffAuto.ON, device_dirty_tracking=False),
    )
    argv = build_qemu_argv(QEMU, plan)
    assert option_after(argv, "-machine") == ["q35,accel=tcg"]
    assert option_after(argv, "-device") == [
        f"vfio-pci,id=vfiocaps-device,sysfsdev=/sys/bus/mdev/devices/{UUID},display=off,"
        "enable-migration=on,x-device-dirty-page-tracking=off"
    ]


def test_device_option_leaves_out_properties_this_qemu_lacks() -> None:
    plan = ProbePlan(
        "q35",
        Accel.TCG,
        VM_UUID,
        qmp_fd=3,
        sysfsdev=Path("/sys/bus/pci/devices/0000:65:00.4"),
        settings=DeviceSettings(OnOffAuto.AUTO, None),
    )
    option = device_option(plan)
    assert option is not None
    assert option.endswith("sysfsdev=/sys/bus/pci/devices/0000:65:00.4,display=auto")


def test_commas_in_paths_are_escaped_for_qemu() -> None:
    plan = ProbePlan("q35", Accel.TCG, VM_UUID, qmp_fd=3, sysfsdev=Path("/sys/odd,name"))
    option = device_option(plan)
    assert option is not None
    assert "sysfsdev=/sys/odd,,name," in option


@pytest.mark.parametrize(
    ("arch", "machine"),
    [("x86_64", "q35"), ("amd64", "q35"), ("aarch64", "virt"), ("ppc64le", "pseries")],
)
def test_machine_per_architecture(arch: str, machine: str) -> None:
    assert machine_for_architecture(arch) == machine


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError):
        machine_for_architecture("pdp11")


def test_every_known_message_names_its_origin_and_versions() -> None:
    for message in KNOWN_MESSAGES:
        assert message.origin
        assert message.versions


def test_benign_warnings_are_never_failures() -> None:
    stderr = (
        f"qemu-system-x86_64: vfio {UUID}: Failed to set up UNMASK eventfd signaling ...\n"
        f"qemu-system-x86_64: vfio {UUID}: Could not enable error recovery for the device\n"
        f"qemu-system-x86_64: vfio: Cannot reset device {UUID}, no available reset mechanism.\n"
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni\n"
    )
    assert first_failure(stderr) is None
    assert excerpt(stderr) == ""


def test_busy_wins_over_surrounding_lines() -> None:
    stderr = (
        "qemu-system-x86_64: -device vfio-pci,...: vfio X: no such host device\n"
        "vfio X: Could not open '/dev/vfio/0': Device or resource busy\n"
    )
    found = first_failure(stderr)
    assert found is not None
    assert found.meaning is Meaning.BUSY


def test_unknown_lines_stay_in_the_excerpt() -> None:
    stderr = "qemu-system-x86_64: vfio: Cannot reset device X, no available reset mechanism.\n"
    stderr += "qemu-system-x86_64: something nobody has seen before\n"
    assert first_failure(stderr) is None
    assert excerpt(stderr) == "qemu-system-x86_64: something nobody has seen before"


def test_a_pci_function_is_named_by_host_address_and_an_mdev_by_sysfs_path() -> None:
    settings = DeviceSettings(OnOffAuto.OFF, OnOffAuto.AUTO)
    vf = Path("/sys/devices/pci0000:40/0000:40:01.1/0000:41:00.4")
    pci = ProbePlan("q35", Accel.KVM, VM_UUID, 7, sysfsdev=vf, settings=settings, host=vf.name)
    option = device_option(pci)
    assert option is not None
    assert "host=0000:41:00.4," in option
    assert "sysfsdev" not in option
    mdev = ProbePlan("q35", Accel.KVM, VM_UUID, 7, sysfsdev=Path(f"/sys/bus/mdev/devices/{UUID}"))
    assert f"sysfsdev=/sys/bus/mdev/devices/{UUID}," in (device_option(mdev) or "")


def test_host_address_only_for_pci_functions_of_the_hosts_own_sysfs() -> None:
    from vfiocaps.model import DeviceKind
    from vfiocaps.prober import ProbeTarget

    vf = ProbeTarget(Path("/sys/bus/pci/devices/0000:41:00.4"), "0000:41:00.4", DeviceKind.PCI, "7")
    assert vf.qemu_host(Path("/sys")) == "0000:41:00.4"
    assert vf.qemu_host(Path("/tmp/tree/sys")) is None  # QEMU would look in the real /sys
    mdev = ProbeTarget(Path(f"/sys/bus/mdev/devices/{UUID}"), UUID, DeviceKind.MDEV, "7")
    assert mdev.qemu_host(Path("/sys")) is None


def test_the_xe_pf_drivers_migration_refusal_is_known() -> None:
    line = "xe 0000:03:00.0: [drm] PF: migration disabled: requires GuC version >= 70.54.0"
    found = first_failure(line)
    assert found is not None
    assert found.meaning is Meaning.MIGRATION_UNSUPPORTED
    assert found.message.origin == "Intel Xe PF driver (xe)"
