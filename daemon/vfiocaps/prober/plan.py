"""Probe plans and the pure function that turns one into a QEMU command line."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProbeError

QMP_CHARDEV_ID = "vfiocaps-qmp"
DEVICE_ID = "vfiocaps-device"
DEVICE_QOM_PATH = f"/machine/peripheral/{DEVICE_ID}"
DEFAULT_MEMORY_MIB = 64
SANDBOX_OPTIONS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

# The machine type that gives a vfio-pci device a PCI(e) bus, per host architecture.
MACHINE_FOR_ARCHITECTURE = {
    "x86_64": "q35",
    "aarch64": "virt",
    "ppc64le": "pseries",
    "ppc64": "pseries",
    "riscv64": "virt",
    "loongarch64": "virt",
}


class UnsupportedArchitectureError(ProbeError):
    """This host architecture has no known machine type for a vfio-pci probe."""


def machine_for_architecture(architecture: str | None = None) -> str:
    """The machine type for *architecture* (default: this host's).

    Raises :class:`UnsupportedArchitectureError` for an architecture without one.
    """
    arch = (architecture or os.uname().machine).lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    try:
        return MACHINE_FOR_ARCHITECTURE[arch]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"no machine type known for architecture {arch!r}"
        ) from None


class Accel(enum.Enum):
    """The accelerator a probe QEMU uses."""

    KVM = "kvm"
    TCG = "tcg"


class OnOffAuto(enum.Enum):
    """QEMU's OnOffAuto property values."""

    ON = "on"
    OFF = "off"
    AUTO = "auto"


@dataclass(frozen=True)
class DeviceSettings:
    """The vfio-pci properties one launch tries. ``None`` leaves QEMU's default in place."""

    display: OnOffAuto = OnOffAuto.AUTO
    migration: OnOffAuto | None = OnOffAuto.AUTO
    device_dirty_tracking: bool | None = None


@dataclass(frozen=True)
class ProbePlan:
    """Everything one probe launch of QEMU is made of."""

    machine: str
    accel: Accel
    vm_uuid: str
    qmp_fd: int
    sysfsdev: Path | None = None
    settings: DeviceSettings = DeviceSettings()
    host: str | None = None  # a PCI function's address: ``host=`` instead of ``sysfsdev=``
    memory_mib: int = DEFAULT_MEMORY_MIB
    sandbox: bool = True
    incoming: bool = False  # start as a migration destination (``-incoming defer``)
    render_node: Path | None = None  # OpenGL through ``-display egl-headless`` on this node


def qemu_option_value(value: str) -> str:
    """Escape *value* for QEMU's ``key=value,...`` option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def device_option(plan: ProbePlan) -> str | None:
    """The ``-device vfio-pci,...`` argument of *plan*, or ``None`` for a bare launch.

    A PCI function is named by ``host=<address>`` when the plan has one (QEMU finds it under
    ``/sys/bus/pci/devices``, as libvirt names PCI host devices); an mdev, or a function in
    another sysfs tree, by ``sysfsdev=<path>``.
    """
    if plan.sysfsdev is None and plan.host is None:
        return None
    settings = plan.settings
    where = (
        f"host={qemu_option_value(plan.host)}"
        if plan.host is not None
        else f"sysfsdev={qemu_option_value(str(plan.sysfsdev))}"
    )
    parts = ["vfio-pci", f"id={DEVICE_ID}", where, f"display={settings.display.value}"]
    if settings.migration is not None:
        parts.append(f"enable-migration={settings.migration.value}")
    if settings.device_dirty_tracking is not None:
        parts.append(
            f"x-device-dirty-page-tracking={'on' if settings.device_dirty_tracking else 'off'}"
        )
    return ",".join(parts)


def display_option(plan: ProbePlan) -> str:
    """The ``-display`` argument: ``none``, or ``egl-headless`` on the plan's render node."""
    if plan.render_node is None:
        return "none"
    return f"egl-headless,rendernode={qemu_option_value(str(plan.render_node))}"


def build_qemu_argv(binary: Path, plan: ProbePlan) -> tuple[str, ...]:
    """The complete QEMU command line for *plan*; pure (no I/O), raises nothing.

    A paused (``-S``) machine without defaults, user config, display (unless the plan gives
    OpenGL a render node: ``egl-headless``, which shows nothing) or network, the QMP monitor
    on the inherited socket *plan.qmp_fd*, ``-uuid`` (some vendor managers read it),
    ``-incoming defer`` for a load, and the seccomp sandbox with every optional restriction.
    """
    argv = [
        str(binary),
        "-S",
        "-nodefaults",
        "-no-user-config",
        "-display",
        display_option(plan),
        "-nic",
        "none",
        "-machine",
        f"{plan.machine},accel={plan.accel.value}",
        "-m",
        str(plan.memory_mib),
        "-uuid",
        plan.vm_uuid,
        "-chardev",
        f"socket,id={QMP_CHARDEV_ID},fd={plan.qmp_fd}",
        "-mon",
        f"chardev={QMP_CHARDEV_ID},mode=control",
    ]
    if plan.incoming:
        argv += ["-incoming", "defer"]
    if plan.sandbox:
        argv += ["-sandbox", SANDBOX_OPTIONS]
    device = device_option(plan)
    if device is not None:
        argv += ["-device", device]
    return tuple(argv)
