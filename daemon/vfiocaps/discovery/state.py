"""What discovery knows, and how each uevent or re-read changes it into domain events."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from ..ids import is_mdev_uuid, is_pci_address
from ..model import (
    Device,
    DeviceAdded,
    DeviceKind,
    DeviceRemoved,
    DiscoveryEvent,
    DriverChanged,
    DriverIdentity,
    HostSnapshot,
    MdevType,
    Parent,
    ParentRegistered,
    ParentUnregistered,
    Resynchronised,
    TypeKind,
)
from .monitor import Uevent
from .scan import PCI_DEVICES, HostReader, ParentReading

log = logging.getLogger("vfiocaps.discovery")

_ARRIVALS = frozenset({"add", "bind", "change", "move", "online"})
_DEPARTURES = frozenset({"remove", "unbind", "offline"})


def _same_types(old: list[MdevType], new: tuple[MdevType, ...]) -> bool:
    """Types are the same when everything but the instance count is."""

    def strip(types: list[MdevType] | tuple[MdevType, ...]) -> list[MdevType]:
        return sorted((replace(t, available_instances=0) for t in types), key=lambda t: t.type_id)

    return strip(old) == strip(new)


@dataclass
class HostState:
    """The mutable truth about the host, changed only through :meth:`apply` and :meth:`resync`.

    Every change returns the domain events it amounts to, in order. A driver's identity is
    remembered after its module is unloaded, so that loading another version of it is reported
    as one :class:`DriverChanged` from the old identity to the new one.
    """

    reader: HostReader
    parents: dict[str, Parent] = field(default_factory=dict)
    types: dict[tuple[str, str], MdevType] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    drivers: dict[str, DriverIdentity] = field(default_factory=dict)
    # Physical functions registered for their VFs' vGPU profiles, and which PF each VF has.
    profile_parents: set[str] = field(default_factory=set)
    vf_parents: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> HostSnapshot:
        """A frozen copy of what is known now."""
        return HostSnapshot(
            parents=dict(self.parents),
            types=dict(self.types),
            devices=dict(self.devices),
            functions=dict(self.vf_parents),
        )

    # ---- drivers --------------------------------------------------------------------------

    def _learn_driver(self, identity: DriverIdentity | None, events: list[DiscoveryEvent]) -> None:
        if identity is None:
            return
        known = self.drivers.get(identity.module)
        if known == identity:
            return
        self.drivers[identity.module] = identity
        if known is not None:
            events.append(DriverChanged(identity.module, known, identity))
            self._retag(identity)

    def _retag(self, identity: DriverIdentity) -> None:
        """Carry a module's new identity into the parents and devices it serves."""
        for name, parent in list(self.parents.items()):
            if parent.driver is not None and parent.driver.module == identity.module:
                self.parents[name] = replace(parent, driver=identity)
        for device_id, device in list(self.devices.items()):
            if device.driver is not None and device.driver.module == identity.module:
                self.devices[device_id] = replace(device, driver=identity)

    # ---- parents --------------------------------------------------------------------------

    def _types_of(self, parent: str) -> list[MdevType]:
        return [t for (p, _), t in self.types.items() if p == parent]

    def _register(self, reading: ParentReading, events: list[DiscoveryEvent]) -> None:
        parent = reading.parent
        if reading.functions:
            reading = replace(reading, types=self._named_profiles(parent.name, reading.types))
        self._learn_driver(parent.driver, events)
        known = self.parents.get(parent.name)
        same = (
            known is not None
            and replace(known, sysfs_path=parent.sysfs_path) == parent
            and _same_types(self._types_of(parent.name), reading.types)
            # A card's room for its profiles is news (a probe may be possible again); an mdev
            # type's count follows its instances' own events.
            and not (reading.functions and self._counts_changed(parent.name, reading.types))
        )
        for key in [k for k in self.types if k[0] == parent.name]:
            del self.types[key]
        for mdev_type in reading.types:
            self.types[(parent.name, mdev_type.type_id)] = mdev_type
        self.parents[parent.name] = parent
        self._forget_functions(parent.name)
        if reading.functions:
            self.profile_parents.add(parent.name)
            for address in reading.functions:
                self.vf_parents[address] = parent.name
        if not same:
            events.append(ParentRegistered(parent, reading.types))

    def _counts_changed(self, parent: str, types: tuple[MdevType, ...]) -> bool:
        return any(
            (known := self.types.get((parent, t.type_id))) is None
            or known.available_instances != t.available_instances
            for t in types
        )

    def _named_profiles(self, parent: str, types: tuple[MdevType, ...]) -> tuple[MdevType, ...]:
        """A physical function's profiles as read, plus those it listed before and lists no
        more: a profile set on every VF that could take it keeps the name it was last listed
        with, and one the card has no room for now (another profile is set: the card is
        homogeneous; or the card is full) stays known with no instance available, so that its
        cached answer stays visible."""
        named = []
        for profile in types:
            known = self.types.get((parent, profile.type_id))
            if not profile.name and known is not None and known.name:
                profile = replace(profile, name=known.name, requires=known.requires)
            named.append(profile)
        listed = {profile.type_id for profile in types}
        for (owner, type_id), known in self.types.items():
            if owner == parent and type_id not in listed and known.kind is TypeKind.VF_PROFILE:
                named.append(replace(known, available_instances=0))
        return tuple(sorted(named, key=lambda profile: int(profile.type_id)))

    def _forget_functions(self, name: str) -> None:
        self.profile_parents.discard(name)
        for address in [a for a, pf in self.vf_parents.items() if pf == name]:
            del self.vf_parents[address]

    def _unregister(self, name: str, events: list[DiscoveryEvent]) -> None:
        parent = self.parents.pop(name, None)
        self._forget_functions(name)
        if parent is None:
            return
        for device in [d for d in self.devices.values() if self._served_by(d, name)]:
            del self.devices[device.device_id]
            events.append(DeviceRemoved(device))
        for key in [k for k in self.types if k[0] == name]:
            del self.types[key]
        events.append(ParentUnregistered(parent))

    @staticmethod
    def _served_by(device: Device, parent: str) -> bool:
        return device.kind is DeviceKind.MDEV and device.parent == parent

    def _parent_named_by(self, devpath: str) -> str | None:
        path = self.reader.sysfs.path(devpath)
        for name, parent in self.parents.items():
            if parent.sysfs_path == path:
                return name
        return None

    def _refresh_parent(self, devpath: str, events: list[DiscoveryEvent]) -> None:
        """Re-read a (possible) parent and report whatever changed."""
        reading = self.reader.read_parent(devpath)
        known = self._parent_named_by(devpath)
        if reading is None:
            gone = not self.reader.sysfs.exists(self.reader.sysfs.path(devpath))
            if known is not None and (gone or known in self.profile_parents):
                self._unregister(known, events)
            return
        self._register(reading, events)

    def _refresh_profiles_of(self, physical_function: str, events: list[DiscoveryEvent]) -> None:
        """Re-read a physical function's vGPU profiles (a VF came, went, or changed)."""
        sysfs = self.reader.sysfs
        real = sysfs.resolve(sysfs.path(f"{PCI_DEVICES}/{physical_function}"))
        reading = self.reader.read_profile_parent(real) if real is not None else None
        if reading is not None:
            self._register(reading, events)
        elif physical_function in self.profile_parents:
            self._unregister(physical_function, events)

    def _refresh_type_counts(self, parent_name: str, type_id: str) -> None:
        key = (parent_name, type_id)
        mdev_type = self.types.get(key)
        parent = self.parents.get(parent_name)
        if mdev_type is None or parent is None:
            return
        fresh = self.reader.read_type(
            parent_name, parent.sysfs_path / "mdev_supported_types" / type_id
        )
        if fresh is not None:
            self.types[key] = fresh

    # ---- devices --------------------------------------------------------------------------

    def _add_device(self, device: Device, events: list[DiscoveryEvent]) -> None:
        self._learn_driver(device.driver, events)
        if self.devices.get(device.device_id) == device:
            return
        self.devices[device.device_id] = device
        events.append(DeviceAdded(device))

    def _remove_device(self, device_id: str, events: list[DiscoveryEvent]) -> None:
        device = self.devices.pop(device_id, None)
        if device is not None:
            events.append(DeviceRemoved(device))

    # ---- uevents --------------------------------------------------------------------------

    def apply(self, uevent: Uevent) -> list[DiscoveryEvent]:
        """The domain events one uevent amounts to (possibly none).

        The event's action is trusted for departures (the device may still be visible in sysfs
        for a moment); arrivals and changes are read from sysfs, so a late event never resurrects
        something that is gone.
        """
        events: list[DiscoveryEvent] = []
        action, subsystem = uevent.action, uevent.subsystem
        name = uevent.devpath.rsplit("/", 1)[-1]
        if subsystem == "module":
            self._module_event(name, action, events)
        elif subsystem == "mdev" and is_mdev_uuid(name):
            self._mdev_event(uevent, name, events)
        else:
            self._device_event(uevent, events)
        return events

    def _module_event(self, module: str, action: str, events: list[DiscoveryEvent]) -> None:
        if action == "remove":
            if module in self.drivers:
                log.info("module %s unloaded", module)
            return
        if action in _ARRIVALS and module in self.drivers:
            self._learn_driver(self.reader.identities.identify(module), events)

    def _mdev_event(self, uevent: Uevent, uuid: str, events: list[DiscoveryEvent]) -> None:
        known = self.devices.get(uuid)
        if uevent.action in _DEPARTURES:
            self._remove_device(uuid, events)
            if known is not None:
                self._refresh_type_counts(known.parent, known.type_id)
            return
        if uevent.action not in _ARRIVALS:
            return
        device = self.reader.read_device_path(self.reader.sysfs.path(uevent.devpath))
        if device is None:
            return
        self._add_device(device, events)
        self._refresh_type_counts(device.parent, device.type_id)

    def _device_event(self, uevent: Uevent, events: list[DiscoveryEvent]) -> None:
        action, devpath = uevent.action, uevent.devpath
        known_parent = self._parent_named_by(devpath)
        if uevent.mdev_state == "unregistered" or (action == "remove" and known_parent):
            if known_parent is not None:
                self._unregister(known_parent, events)
        elif (
            uevent.mdev_state == "registered"
            or known_parent is not None
            or (action in _ARRIVALS and self._listed_as_parent(devpath))
            or (action in _ARRIVALS and uevent.subsystem == "pci" and self._has_vfs(devpath))
        ):
            self._refresh_parent(devpath, events)
        if uevent.subsystem == "pci":
            self._pci_event(uevent, events)
            self._function_event(devpath, events)

    def _has_vfs(self, devpath: str) -> bool:
        """Whether the PCI device at *devpath* is an SR-IOV physical function."""
        sysfs = self.reader.sysfs
        return sysfs.exists(sysfs.path(devpath) / "sriov_numvfs")

    def _function_event(self, devpath: str, events: list[DiscoveryEvent]) -> None:
        """A virtual function came, went, changed or was re-bound: its physical function's
        profiles (the profiles it offers, how many VFs can take each) are read again."""
        address = devpath.rsplit("/", 1)[-1]
        if not is_pci_address(address):
            return
        physical_function = self.vf_parents.get(address)
        if physical_function is None:
            sysfs = self.reader.sysfs
            physical_function = sysfs.link_name(sysfs.path(devpath) / "physfn")
        if physical_function and physical_function != address:
            self._refresh_profiles_of(physical_function, events)

    def _listed_as_parent(self, devpath: str) -> bool:
        name = devpath.rsplit("/", 1)[-1]
        sysfs = self.reader.sysfs
        return sysfs.resolve(sysfs.path(f"class/mdev_bus/{name}")) == sysfs.path(devpath)

    def _pci_event(self, uevent: Uevent, events: list[DiscoveryEvent]) -> None:
        address = uevent.devpath.rsplit("/", 1)[-1]
        known = self.devices.get(address)
        if uevent.action == "remove" or (uevent.action == "unbind" and known is not None):
            if known is not None and known.kind is DeviceKind.PCI:
                self._remove_device(address, events)
            return
        if uevent.action not in _ARRIVALS:
            return
        device = self.reader.read_device_path(self.reader.sysfs.path(uevent.devpath))
        if device is not None and device.kind is DeviceKind.PCI:
            self._add_device(device, events)
        elif known is not None and known.kind is DeviceKind.PCI:
            self._remove_device(address, events)

    # ---- re-reading -----------------------------------------------------------------------

    def resync(self, fresh: HostSnapshot) -> list[DiscoveryEvent]:
        """Replace what is known by *fresh* (read from scratch); return the difference as
        events, removals first, ending with :class:`Resynchronised`."""
        events: list[DiscoveryEvent] = []
        for device_id, device in list(self.devices.items()):
            if device_id not in fresh.devices:
                del self.devices[device_id]
                events.append(DeviceRemoved(device))
        for name in list(self.parents):
            if name not in fresh.parents:
                self._unregister(name, events)
        for parent in fresh.parents.values():
            types = tuple(t for (p, _), t in fresh.types.items() if p == parent.name)
            functions = tuple(a for a, pf in fresh.functions.items() if pf == parent.name)
            self._register(ParentReading(parent, types, functions), events)
        for device in fresh.devices.values():
            self._add_device(device, events)
        # Instance counts and anything else the events above did not carry (a profile no VF
        # lists keeps the name and the place registration gave it).
        kept = self.types
        self.types = {
            key: replace(fresh_type, name=kept[key].name)
            if fresh_type.kind is TypeKind.VF_PROFILE and not fresh_type.name and key in kept
            else fresh_type
            for key, fresh_type in fresh.types.items()
        }
        for key, known in kept.items():
            if key not in self.types and known.kind is TypeKind.VF_PROFILE:
                self.types[key] = replace(known, available_instances=0)
        events.append(Resynchronised(self.snapshot()))
        return events
