"""Building what consumers read (device and type views) from the table, the cache and the host."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..capabilities import Capabilities
from ..model import HostSnapshot, MdevType, Parent, TypeKind
from ..store import CapabilityKey, CapabilityRecord, KnownDevice
from .keys import driver_of, parent_pci_id
from .table import DeviceEntry
from .views import DeviceView, ProbeState, TypeView

RecordOf = Callable[[CapabilityKey | None], CapabilityRecord | None]


def device_view(
    entry: DeviceEntry, record: CapabilityRecord | None, host: HostSnapshot
) -> DeviceView:
    """One device's view; capabilities only while its state is ``done``."""
    type_name = entry.device.type_name
    mdev_type = host.types.get((entry.device.parent, entry.device.type_id))
    if not type_name and mdev_type is not None:
        type_name = mdev_type.name
    capabilities = record.capabilities if record else None
    return DeviceView(
        device=entry.device,
        driver=driver_of(entry.device, host),
        type_name=type_name,
        state=entry.state,
        capabilities=capabilities if entry.state is ProbeState.DONE else None,
        probed_at_us=record.probed_at_us if record else 0,
        last_error=entry.last_error,
        parent_pci_id=parent_pci_id(entry.device, host),
    )


def type_views(
    host: HostSnapshot,
    entries: Iterable[DeviceEntry],
    record_of: RecordOf,
    type_capabilities: Callable[[Parent | None, MdevType], Capabilities | None],
) -> list[TypeView]:
    """Every mdev type of every registered parent, plus the types of live PCI devices."""
    live = sorted(entries, key=lambda e: e.device.device_id)
    counts: dict[tuple[str, str], int] = {}
    for entry in live:
        ident = (entry.device.parent, entry.device.type_id)
        counts[ident] = counts.get(ident, 0) + 1
    result: list[TypeView] = []
    seen: set[tuple[str, str]] = set()
    for (parent_name, type_id), mdev_type in sorted(host.types.items()):
        parent = host.parents.get(parent_name)
        result.append(
            TypeView(
                parent=parent_name,
                type_id=type_id,
                name=mdev_type.name,
                description=mdev_type.description,
                device_api=mdev_type.device_api,
                available_instances=mdev_type.available_instances,
                instances=counts.get((parent_name, type_id), 0),
                driver=parent.driver if parent else None,
                capabilities=type_capabilities(parent, mdev_type),
                kind=mdev_type.kind,
                parent_pci_id=parent.pci_id if parent else "",
                requires=mdev_type.requires,
            )
        )
        seen.add((parent_name, type_id))
    for entry in live:
        device = entry.device
        ident = (device.parent, device.type_id)
        if ident in seen:
            continue
        seen.add(ident)
        record = record_of(entry.key)
        result.append(
            TypeView(
                parent=device.parent,
                type_id=device.type_id,
                name=device.type_name,
                description="",
                device_api=device.device_api,
                available_instances=0,
                instances=counts.get(ident, 0),
                driver=driver_of(device, host),
                capabilities=record.capabilities if record else None,
                kind=TypeKind(device.kind.value),
                parent_pci_id=parent_pci_id(device, host),
            )
        )
    return result


def known_devices(
    entries: Iterable[DeviceEntry], host: HostSnapshot, now_us: int
) -> list[KnownDevice]:
    """The known-devices rows of the live devices, seen at *now_us*."""
    known = []
    for entry in entries:
        device, driver = entry.device, driver_of(entry.device, host)
        known.append(
            KnownDevice(
                device_id=device.device_id,
                kind=device.kind.value,
                sysfs_path=device.sysfs_path,
                parent=device.parent,
                type_id=device.type_id,
                driver=driver.module if driver else "",
                driver_version=driver.version if driver else "",
                last_seen_us=now_us,
            )
        )
    return known
