"""Cache keys of devices and the records each kind of change makes stale; pure functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..capabilities import ProbeOutcome
from ..model import Device, DeviceKind, DriverIdentity, HostSnapshot, MdevType, Parent
from ..store import CapabilityKey, CapabilityRecord, QemuIdentity


def driver_of(device: Device, snapshot: HostSnapshot) -> DriverIdentity | None:
    """The driver serving *device*: its parent's for an mdev, its own for a PCI function."""
    if device.kind is DeviceKind.MDEV:
        parent = snapshot.parents.get(device.parent)
        if parent is not None and parent.driver is not None:
            return parent.driver
    return device.driver


def parent_pci_id(device: Device, snapshot: HostSnapshot) -> str:
    """``vvvv:dddd`` of the PCI device behind *device*, or empty when there is none."""
    if device.kind is DeviceKind.PCI:
        if device.pci_vendor is None or device.pci_device is None:
            return ""
        return f"{device.pci_vendor:04x}:{device.pci_device:04x}"
    parent = snapshot.parents.get(device.parent)
    return parent.pci_id if parent else ""


def make_key(
    driver: DriverIdentity, pci_id: str, type_id: str, kernel_release: str, qemu: QemuIdentity
) -> CapabilityKey:
    """The key of one type under one driver, kernel and QEMU binary."""
    return CapabilityKey(
        driver=driver.module,
        driver_version=driver.version,
        kernel_release=kernel_release,
        parent_pci_id=pci_id,
        type_id=type_id,
        qemu_path=qemu.path,
        qemu_version=qemu.version,
        qemu_ctime_ns=qemu.ctime_ns,
    )


def key_for(
    device: Device, snapshot: HostSnapshot, kernel_release: str, qemu: QemuIdentity | None
) -> CapabilityKey | None:
    """The key of *device*, or None while its driver or the QEMU binary is unknown."""
    driver = driver_of(device, snapshot)
    if driver is None or qemu is None:
        return None
    return make_key(driver, parent_pci_id(device, snapshot), device.type_id, kernel_release, qemu)


def stale_for_driver(
    keys: Iterable[CapabilityKey], module: str, new_version: str
) -> list[CapabilityKey]:
    """Keys of *module* made under another version than *new_version*."""
    return [key for key in keys if key.driver == module and key.driver_version != new_version]


def keys_of_driver(keys: Iterable[CapabilityKey], module: str) -> list[CapabilityKey]:
    """Every key of *module* (an explicit invalidation)."""
    return [key for key in keys if key.driver == module]


def stale_for_qemu(keys: Iterable[CapabilityKey], ctime_ns: int) -> list[CapabilityKey]:
    """Keys made with a QEMU binary other than the one changed at *ctime_ns*."""
    return [key for key in keys if key.qemu_ctime_ns != ctime_ns]


def stale_at_start(
    keys: Iterable[CapabilityKey], kernel_release: str, qemu: QemuIdentity | None
) -> tuple[dict[str, list[CapabilityKey]], list[CapabilityKey]]:
    """Keys made under another kernel (by that kernel), and under another QEMU binary."""
    by_kernel: dict[str, list[CapabilityKey]] = {}
    stale_qemu: list[CapabilityKey] = []
    for key in keys:
        if key.kernel_release != kernel_release:
            by_kernel.setdefault(key.kernel_release, []).append(key)
        elif qemu is not None and (
            key.qemu_path != qemu.path or key.qemu_ctime_ns != qemu.ctime_ns
        ):
            stale_qemu.append(key)
    return by_kernel, stale_qemu


def versions(values: Iterable[str]) -> str:
    """Distinct versions, sorted and comma-separated, as invalidation signals carry them."""
    return ",".join(sorted(set(values)))


def idle_types(
    snapshot: HostSnapshot,
    live: set[tuple[str, str]],
    kernel_release: str,
    qemu: QemuIdentity | None,
    record_of: Callable[[CapabilityKey], CapabilityRecord | None],
    now_us: int,
) -> list[tuple[Parent, MdevType]]:
    """Types with room for an instance, none of them *live*, and no answer or due retry cached."""
    idle = []
    for (parent_name, type_id), mdev_type in sorted(snapshot.types.items()):
        parent = snapshot.parents.get(parent_name)
        if parent is None or parent.driver is None or qemu is None:
            continue
        if (parent_name, type_id) in live or mdev_type.available_instances <= 0:
            continue
        record = record_of(make_key(parent.driver, parent.pci_id, type_id, kernel_release, qemu))
        if record is not None and (
            record.outcome is ProbeOutcome.OK or record.retry_at_us > now_us
        ):
            continue
        idle.append((parent, mdev_type))
    return idle
