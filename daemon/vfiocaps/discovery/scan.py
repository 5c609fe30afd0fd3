"""Reading parents, their types (mdev types, SR-IOV vGPU profiles) and VFIO devices out of
sysfs, one object or the whole host."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..ids import is_mdev_uuid, is_pci_address, is_sysfs_name
from ..model import Device, DeviceKind, DriverIdentity, HostSnapshot, MdevType, Parent
from .functions import CURRENT_PROFILE, PROFILE_DIR, FunctionReader, profile_types
from .identity import IdentityResolver
from .sysfs import SysfsTree

# The name checks are also importable from here, where they were first defined.
__all__ = ["HostReader", "ParentReading", "is_mdev_uuid", "is_pci_address", "is_vfio_pci_driver"]

log = logging.getLogger("vfiocaps.discovery")

MDEV_BUS_CLASS = "class/mdev_bus"
MDEV_DEVICES = "bus/mdev/devices"
PCI_DEVICES = "bus/pci/devices"
VFIO_PCI_SUFFIX = "vfio-pci"


def is_vfio_pci_driver(driver: str) -> bool:
    """``vfio-pci`` or a variant (``mlx5_vfio_pci``, ``hisi_acc_vfio_pci``...)."""
    return driver.replace("_", "-").endswith(VFIO_PCI_SUFFIX)


@dataclass(frozen=True)
class ParentReading:
    """A registered parent and its types as read at one moment (for a physical function with
    vGPU profiles, also the addresses of its virtual functions)."""

    parent: Parent
    types: tuple[MdevType, ...]
    functions: tuple[str, ...] = ()


class HostReader:
    """Reads host objects from a :class:`SysfsTree`; every method returns ``None`` rather than
    raising when an object is absent, vanishes mid-read, or holds content it does not understand.
    """

    def __init__(self, sysfs: SysfsTree, identities: IdentityResolver) -> None:
        self.sysfs = sysfs
        self.identities = identities
        # Within one full scan (see :meth:`host`): what every instance of a parent or a type
        # would otherwise read again.
        self._parent_identities: dict[tuple[str, str], DriverIdentity | None] | None = None
        self._mdev_parents: dict[str, DriverIdentity | None] | None = None
        self._type_labels: dict[str, tuple[str, str]] | None = None
        self._iommu_groups = str(sysfs.path("kernel/iommu_groups"))
        self.functions = FunctionReader(sysfs)

    # ---- parents and types ----------------------------------------------------------------

    def parent_identity(self, parent_dir: Path, subsystem: str) -> DriverIdentity | None:
        """The driver of a parent: its bound driver, else (virtual parents such as the kernel's
        samples) the module named like its class, if that module is loaded."""
        memo = self._parent_identities
        if memo is None:
            return self._read_parent_identity(parent_dir, subsystem)
        key = (str(parent_dir), subsystem)
        if key not in memo:
            memo[key] = self._read_parent_identity(parent_dir, subsystem)
        return memo[key]

    def _read_parent_identity(self, parent_dir: Path, subsystem: str) -> DriverIdentity | None:
        bound = self.identities.identify_driver(parent_dir)
        if bound is not None:
            return bound
        if subsystem and subsystem != "pci":
            return self.identities.identify(subsystem)
        return None

    def read_type(self, parent: str, type_dir: Path) -> MdevType | None:
        """One entry of ``mdev_supported_types``."""
        type_id = type_dir.name
        if not is_sysfs_name(type_id):
            log.warning("sysfs: mdev type %r of %s has an unusable name; skipped", type_id, parent)
            return None
        real = self.sysfs.resolve(type_dir)
        if real is None or not os.path.isdir(real):
            return None
        available_text = self.sysfs.read_attribute(real, "available_instances")
        if available_text is None:
            log.debug("sysfs: type %s of %s has no readable available_instances", type_id, parent)
            return None
        available = _parse_count(available_text)
        if available is None:
            log.warning(
                "sysfs: %s/available_instances holds %r; type skipped", real, available_text[:64]
            )
            return None
        return MdevType(
            parent=parent,
            type_id=type_id,
            name=_printable_or_empty(self.sysfs.read_attribute(real, "name")),
            description=_printable_or_empty(self.sysfs.read_attribute(real, "description")),
            device_api=_printable_or_empty(self.sysfs.read_attribute(real, "device_api")),
            available_instances=available,
        )

    def read_parent_dir(self, parent_dir: Path) -> ParentReading | None:
        """A parent at its resolved device directory, if it is registered with mdev now
        (listed in ``class/mdev_bus`` and offering ``mdev_supported_types``)."""
        name = parent_dir.name
        if not is_sysfs_name(name):
            return None
        listed = self.sysfs.resolve(self.sysfs.path(f"{MDEV_BUS_CLASS}/{name}"))
        if listed is None or listed != parent_dir:
            return self.read_profile_parent(parent_dir)
        types_dir = parent_dir / "mdev_supported_types"
        if not self.sysfs.is_dir(types_dir):
            return None
        subsystem = self.sysfs.link_name(parent_dir / "subsystem") or ""
        vendor = device = None
        if subsystem == "pci":
            vendor = self.sysfs.read_int(parent_dir / "vendor", 16)
            device = self.sysfs.read_int(parent_dir / "device", 16)
        parent = Parent(
            name=name,
            sysfs_path=parent_dir,
            subsystem=subsystem,
            driver=self.parent_identity(parent_dir, subsystem),
            pci_vendor=vendor,
            pci_device=device,
        )
        types = []
        for type_id in self.sysfs.list_dir(types_dir):
            mdev_type = self.read_type(name, types_dir / type_id)
            if mdev_type is not None:
                types.append(mdev_type)
        return ParentReading(parent, tuple(types))

    def read_parent(self, devpath: str) -> ParentReading | None:
        """A parent by its devpath (``/devices/...``)."""
        real = self.sysfs.resolve(self.sysfs.path(devpath))
        if real is None:
            return None
        return self.read_parent_dir(real)

    def parents(self) -> list[ParentReading]:
        """Every registered parent (``class/mdev_bus``) and every physical function whose
        virtual functions offer vGPU profiles."""
        readings = []
        for name in self.sysfs.list_dir(self.sysfs.path(MDEV_BUS_CLASS)):
            real = self.sysfs.resolve(self.sysfs.path(f"{MDEV_BUS_CLASS}/{name}"))
            if real is None or real.name != name:
                continue
            reading = self.read_parent_dir(real)
            if reading is not None:
                readings.append(reading)
        known = {reading.parent.name for reading in readings}
        pci = self.sysfs.path(PCI_DEVICES)
        for name in self.sysfs.list_dir(pci):
            if name in known or not is_pci_address(name):
                continue
            real = self.sysfs.resolve(pci / name)
            if real is not None and real.name == name:
                profile_reading = self.read_profile_parent(real)
                if profile_reading is not None:
                    readings.append(profile_reading)
        return readings

    # ---- SR-IOV vGPU profiles -------------------------------------------------------------

    def read_profile_parent(self, pf_dir: Path) -> ParentReading | None:
        """A physical function as a parent of vGPU profiles, if any of its virtual functions
        carries profile attributes; its types are the profiles its VFs can take now, plus
        those set on a VF (which then no other VF may list)."""
        name = pf_dir.name
        if not is_pci_address(name) or self.sysfs.link_name(pf_dir / "subsystem") != "pci":
            return None
        if self.sysfs.read_attribute(pf_dir, "sriov_numvfs") is None:
            return None
        functions = self.functions.virtual_functions(pf_dir)
        if not functions:
            return None
        parent = Parent(
            name=name,
            sysfs_path=pf_dir,
            subsystem="pci",
            driver=self.parent_identity(pf_dir, "pci"),
            pci_vendor=self.sysfs.read_int(pf_dir / "vendor", 16),
            pci_device=self.sysfs.read_int(pf_dir / "device", 16),
        )
        types = profile_types(name, functions)
        return ParentReading(parent, types, tuple(f.address for f in functions))

    def _parent_version(self, pf_dir: Path) -> str:
        """``<module> <version>`` of a physical function's driver, with ``fw <version>`` where
        sysfs shows its firmware."""
        driver = self.parent_identity(pf_dir, "pci")
        if driver is None:
            return ""
        firmware = self.functions.firmware(pf_dir)
        return driver.describe() + (f" fw {firmware}" if firmware else "")

    # ---- devices --------------------------------------------------------------------------

    def _read_mdev(self, device_dir: str) -> Device | None:
        """An mdev instance at its resolved directory, if it is bound to a driver."""
        parent_dir, _, uuid = device_dir.rpartition("/")
        if not is_mdev_uuid(uuid):
            return None
        type_dir = self.sysfs.resolve_str(device_dir + "/mdev_type")
        if type_dir is None:
            return None
        types_dir, _, type_id = type_dir.rpartition("/")
        types_parent, _, types_name = types_dir.rpartition("/")
        if types_name != "mdev_supported_types" or types_parent != parent_dir:
            log.warning("sysfs: %s/mdev_type points to %s; skipped", device_dir, type_dir)
            return None
        if self.sysfs.resolve_str(device_dir + "/driver") is None:
            log.debug("sysfs: mdev %s is not bound to a driver", uuid)
            return None
        type_name, device_api = self._labels_of_type(type_dir)
        return Device(
            kind=DeviceKind.MDEV,
            device_id=uuid,
            sysfs_path=device_dir,
            parent=parent_dir.rpartition("/")[2],
            type_id=type_id,
            type_name=type_name,
            device_api=device_api,
            driver=self._mdev_parent_driver(parent_dir),
            iommu_group=self.iommu_group(device_dir),
        )

    def read_pci_dir(self, device_dir: Path) -> Device | None:
        """A PCI function at its resolved directory, if it is a VFIO device: an NVIDIA SR-IOV
        vGPU function while a vGPU profile is set on it, else a function bound to vfio-pci or
        a variant of it (one with ``vfio-dev``).

        A function with NVIDIA's profile directory is judged by its profile alone: nvidia.ko
        registers every VF with vfio-pci-core, so a free VF has ``vfio-dev`` too, yet cannot
        be opened ("current_vgpu_type of VF not configured")."""
        address = device_dir.name
        if not is_pci_address(address):
            return None
        bound = self.identities.driver_module(device_dir)
        if bound is None:
            return None
        driver, _module = bound
        vgpu_type = None
        if self.sysfs.exists(device_dir / PROFILE_DIR):
            vgpu_type = self.sysfs.read_text(device_dir / PROFILE_DIR / CURRENT_PROFILE) or ""
            if not (vgpu_type.isascii() and vgpu_type.isdigit() and len(vgpu_type) <= 9):
                if vgpu_type:
                    log.warning(
                        "sysfs: %s/%s/%s holds %r; skipped",
                        device_dir, PROFILE_DIR, CURRENT_PROFILE, vgpu_type[:64],
                    )  # fmt: skip
                return None
            if int(vgpu_type) == 0:
                return None  # a free VF: no VM can open it until a profile is set
        is_vgpu = vgpu_type is not None
        is_vfio = not is_vgpu and (
            is_vfio_pci_driver(driver) or self.sysfs.is_dir(device_dir / "vfio-dev")
        )
        if not (is_vgpu or is_vfio):
            return None
        vendor = self.sysfs.read_int(device_dir / "vendor", 16)
        device = self.sysfs.read_int(device_dir / "device", 16)
        if vendor is None or device is None:
            return None
        physfn_dir = self.sysfs.resolve(device_dir / "physfn")
        physfn = physfn_dir.name if physfn_dir is not None else None
        parent_version = ""
        if physfn_dir is not None and is_vfio and not is_vgpu and is_pci_address(physfn_dir.name):
            parent_version = self._parent_version(physfn_dir)
        return Device(
            kind=DeviceKind.PCI,
            device_id=address,
            sysfs_path=str(device_dir),
            parent=physfn if physfn and is_pci_address(physfn) else "",
            type_id=str(int(vgpu_type)) if is_vgpu and vgpu_type else f"{vendor:04x}:{device:04x}",
            device_api="vfio-pci",
            driver=self.identities.identify_driver(device_dir),
            iommu_group=self.iommu_group(str(device_dir)),
            pci_vendor=vendor,
            pci_device=device,
            parent_version=parent_version,
        )

    def _mdev_parent_driver(self, parent_dir: str) -> DriverIdentity | None:
        """The driver of an instance's parent, read once per parent during a full scan."""
        memo = self._mdev_parents
        if memo is not None and parent_dir in memo:
            return memo[parent_dir]
        path = Path(parent_dir)
        subsystem = self.sysfs.link_name(path / "subsystem") or ""
        driver = self.parent_identity(path, subsystem)
        if memo is not None:
            memo[parent_dir] = driver
        return driver

    def _labels_of_type(self, type_dir: str) -> tuple[str, str]:
        """A type's ``name`` and ``device_api``, read once per type during a full scan."""
        memo = self._type_labels
        if memo is not None and type_dir in memo:
            return memo[type_dir]
        labels = (
            _printable_or_empty(self.sysfs.read_attribute(type_dir, "name")),
            _printable_or_empty(self.sysfs.read_attribute(type_dir, "device_api")),
        )
        if memo is not None:
            memo[type_dir] = labels
        return labels

    def iommu_group(self, device_dir: str) -> str | None:
        """The device's IOMMU group number: its ``iommu_group`` link must resolve to
        ``<sysfs>/kernel/iommu_groups/<number>``; anything else is refused."""
        real = self.sysfs.resolve_str(device_dir + "/iommu_group")
        if real is None:
            return None
        groups, _, group = real.rpartition("/")
        if groups != self._iommu_groups or not (group.isascii() and group.isdigit()):
            log.warning("sysfs: %s/iommu_group points to %s; not a group", device_dir, real)
            return None
        return group

    def read_device_path(self, path: Path) -> Device | None:
        """The VFIO device at *path* (any path in the tree that leads to it), or ``None``."""
        return self._read_device(str(path))

    def _read_device(self, path: str) -> Device | None:
        real = self.sysfs.resolve_str(path)
        if real is None or not os.path.isdir(real):
            return None
        name = real.rpartition("/")[2]
        if is_mdev_uuid(name):
            return self._read_mdev(real)
        if is_pci_address(name) and self.sysfs.link_name(Path(real) / "subsystem") == "pci":
            return self.read_pci_dir(Path(real))
        return None

    def devices(self) -> list[Device]:
        """Every VFIO device: bound mdev instances and VFIO PCI functions."""
        found = []
        for listing in (MDEV_DEVICES, PCI_DEVICES):
            directory = self.sysfs.path(listing)
            for name in self.sysfs.list_dir(directory):
                device = self._read_device(f"{directory}/{name}")
                if device is not None and device.device_id == name:
                    found.append(device)
        return found

    def host(self) -> HostSnapshot:
        """Everything, read from scratch."""
        parents: dict[str, Parent] = {}
        types: dict[tuple[str, str], MdevType] = {}
        functions: dict[str, str] = {}
        with self.sysfs.scan(), self._identities_memoized():
            for reading in self.parents():
                parents[reading.parent.name] = reading.parent
                for mdev_type in reading.types:
                    types[(mdev_type.parent, mdev_type.type_id)] = mdev_type
                for address in reading.functions:
                    functions[address] = reading.parent.name
            devices = {device.device_id: device for device in self.devices()}
        return HostSnapshot(parents=parents, types=types, devices=devices, functions=functions)

    @contextlib.contextmanager
    def _identities_memoized(self) -> Iterator[None]:
        """Within one full scan, what instances share (their parent's driver identity and
        subsystem, their type's labels) is read once, not per device."""
        self._parent_identities, self._mdev_parents, self._type_labels = {}, {}, {}
        try:
            yield
        finally:
            self._parent_identities, self._mdev_parents, self._type_labels = None, None, None


def _printable_or_empty(value: str | None) -> str:
    if value is None:
        return ""
    if not value.isprintable():
        return "".join(c if c.isprintable() else " " for c in value)
    return value


def _parse_count(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return int(text)
