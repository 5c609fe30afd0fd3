"""Cache keys of devices and the records each kind of change makes stale; pure functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..capabilities import ProbeOutcome
from ..model import Device, DeviceKind, DriverIdentity, HostSnapshot, MdevType, Parent, TypeKind
from ..store import CapabilityKey, CapabilityRecord, QemuIdentity


def driver_of(device: Device, snapshot: HostSnapshot) -> DriverIdentity | None:
    """The driver serving *device*: its parent's for a device of a parent's type (an mdev, a VF
    with a vGPU profile), as the type itself is keyed; its own for any other PCI function."""
    parent = snapshot.parents.get(device.parent)
    if parent is not None and parent.driver is not None:
        return parent.driver
    return device.driver


def parent_pci_id(device: Device, snapshot: HostSnapshot) -> str:
    """``vvvv:dddd`` of the PCI device behind *device*: its registered parent's, else a PCI
    function's own; empty when there is none."""
    parent = snapshot.parents.get(device.parent)
    if parent is not None:
        return parent.pci_id
    if device.kind is DeviceKind.PCI:
        if device.pci_vendor is None or device.pci_device is None:
            return ""
        return f"{device.pci_vendor:04x}:{device.pci_device:04x}"
    return ""


def type_identity(mdev_type: MdevType) -> str:
    """What names *mdev_type* in a cache key: a vGPU profile by its name (profile ids are
    unique only within one card model; the key's ``parent_pci_id`` names the model), any
    other type, and a profile whose name is not known, by its id."""
    if mdev_type.kind is TypeKind.VF_PROFILE and mdev_type.name:
        return mdev_type.name
    return mdev_type.type_id


def device_type_identity(device: Device, snapshot: HostSnapshot) -> str:
    """:func:`type_identity` of the type *device* is an instance of (its own id for a PCI
    function that is no instance of a parent's type)."""
    mdev_type = snapshot.types.get((device.parent, device.type_id))
    if mdev_type is None or device.kind is not DeviceKind.PCI:
        return device.type_id
    return type_identity(mdev_type)


def make_key(
    driver: DriverIdentity,
    pci_id: str,
    type_id: str,
    kernel_release: str,
    qemu: QemuIdentity,
    parent_version: str = "",
) -> CapabilityKey:
    """The key of one type under one driver, kernel and QEMU binary. A VF on a variant driver
    also depends on its physical function's driver (and firmware): *parent_version*."""
    return CapabilityKey(
        driver=driver.module,
        driver_version=f"{driver.version} on {parent_version}"
        if parent_version
        else driver.version,
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
    return make_key(
        driver,
        parent_pci_id(device, snapshot),
        device_type_identity(device, snapshot),
        kernel_release,
        qemu,
        device.parent_version,
    )


@dataclass(frozen=True, slots=True)
class Invalidation:
    """Records made stale by one change: of *driver* (or ``kernel``, ``qemu``), *old* -> *new*."""

    driver: str
    old: str
    new: str
    stale: tuple[CapabilityKey, ...]


def versions(values: Iterable[str]) -> str:
    """Distinct versions, sorted and comma-separated, as invalidation signals carry them."""
    return ",".join(sorted(set(values)))


def driver_changed(
    keys: Iterable[CapabilityKey],
    module: str,
    old: DriverIdentity | None,
    new: DriverIdentity | None,
) -> Invalidation:
    """A driver was reloaded or re-bound: its keys of any other version are stale."""
    new_version = new.version if new else ""
    stale = [key for key in keys if key.driver == module and key.driver_version != new_version]
    return Invalidation(module, old.version if old else "", new_version, tuple(stale))


def driver_invalidated(
    keys: Iterable[CapabilityKey], module: str, live: Iterable[str]
) -> Invalidation:
    """Every key of *module* (an explicit request); *live* are the versions now loaded."""
    stale = tuple(key for key in keys if key.driver == module)
    return Invalidation(module, versions(k.driver_version for k in stale), versions(live), stale)


def qemu_changed(
    keys: Iterable[CapabilityKey], old: QemuIdentity, new: QemuIdentity
) -> Invalidation:
    """The QEMU binary changed: keys made with another binary are stale."""
    stale = tuple(key for key in keys if key.qemu_ctime_ns != new.ctime_ns)
    return Invalidation("qemu", old.version, new.version, stale)


def at_start(
    keys: Iterable[CapabilityKey], kernel_release: str, qemu: QemuIdentity | None
) -> list[Invalidation]:
    """Keys made under another kernel (one invalidation per kernel) or another QEMU binary."""
    by_kernel: dict[str, list[CapabilityKey]] = {}
    stale_qemu: list[CapabilityKey] = []
    for key in keys:
        if key.kernel_release != kernel_release:
            by_kernel.setdefault(key.kernel_release, []).append(key)
        elif qemu is not None and (
            key.qemu_path != qemu.path or key.qemu_ctime_ns != qemu.ctime_ns
        ):
            stale_qemu.append(key)
    found = [
        Invalidation("kernel", old, kernel_release, tuple(stale))
        for old, stale in by_kernel.items()
    ]
    if stale_qemu and qemu is not None:
        old_versions = versions(key.qemu_version for key in stale_qemu)
        found.append(Invalidation("qemu", old_versions, qemu.version, tuple(stale_qemu)))
    return found


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
        if mdev_type.requires:
            continue  # needs what vfiocapsd does not make (a GPU instance)
        key = make_key(parent.driver, parent.pci_id, type_identity(mdev_type), kernel_release, qemu)
        record = record_of(key)
        if record is not None and (
            record.outcome is ProbeOutcome.OK or record.retry_at_us > now_us
        ):
            continue
        idle.append((parent, mdev_type))
    return idle
