"""The host's VFIO world as discovery sees it: parents, types, devices, drivers, events."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DriverIdentity:
    """Which driver code serves a parent, precise enough to key a capability cache.

    The version is chosen by a fixed rule, and ``version_source`` says which rule applied:

    1. ``module-version``: ``/sys/module/<m>/version`` (``MODULE_VERSION``; nvidia, mtty);
    2. ``srcversion``: ``/sys/module/<m>/srcversion`` (a hash of the module's sources);
    3. ``module-file``: a fingerprint of the module file as ``modinfo`` would find it
       (mdpy and mbochs declare neither of the above);
    4. ``kernel``: the kernel release, for drivers built into the kernel.
    """

    module: str
    version: str
    version_source: str
    kernel_release: str

    def describe(self) -> str:
        """``module version`` as a person would write it, e.g. ``nvidia 550.54.14``."""
        return f"{self.module} {self.version}"


class DeviceKind(enum.Enum):
    """The two kinds of VFIO device vfiocaps knows."""

    MDEV = "mdev"
    PCI = "pci"


@dataclass(frozen=True, slots=True)
class Parent:
    """A device that offers mdev types (``/sys/class/mdev_bus/<name>``)."""

    name: str
    sysfs_path: Path
    subsystem: str
    driver: DriverIdentity | None
    pci_vendor: int | None = None
    pci_device: int | None = None

    @property
    def pci_id(self) -> str:
        """``vvvv:dddd`` in lower-case hex, or empty when the parent is not a PCI device."""
        if self.pci_vendor is None or self.pci_device is None:
            return ""
        return f"{self.pci_vendor:04x}:{self.pci_device:04x}"


@dataclass(frozen=True, slots=True)
class MdevType:
    """One entry of a parent's ``mdev_supported_types``."""

    parent: str
    type_id: str
    name: str
    description: str
    device_api: str
    available_instances: int


@dataclass(frozen=True, slots=True)
class Device:
    """A VFIO device that a VM could be given: an mdev instance or a VFIO PCI function.

    ``device_id`` is the UUID for an mdev and the PCI address (``0000:65:00.4``) for a PCI
    device. For a PCI device, ``type_id`` is the vGPU type where one is set (NVIDIA SR-IOV
    ``nvidia/current_vgpu_type``), else ``vendor:device``. ``sysfs_path`` is the resolved
    device directory, kept as a string: a host can have many thousands of devices.
    """

    kind: DeviceKind
    device_id: str
    sysfs_path: str
    parent: str
    type_id: str
    type_name: str = ""
    device_api: str = "vfio-pci"
    driver: DriverIdentity | None = None
    iommu_group: str | None = None
    pci_vendor: int | None = None
    pci_device: int | None = None


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """Everything discovery knows at one moment."""

    parents: dict[str, Parent] = field(default_factory=dict)
    types: dict[tuple[str, str], MdevType] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)


# Domain events. Discovery emits them in the order the host changed; consumers never see raw
# uevents.


@dataclass(frozen=True, slots=True)
class DeviceAdded:
    device: Device


@dataclass(frozen=True, slots=True)
class DeviceRemoved:
    device: Device


@dataclass(frozen=True, slots=True)
class ParentRegistered:
    parent: Parent
    types: tuple[MdevType, ...]


@dataclass(frozen=True, slots=True)
class ParentUnregistered:
    parent: Parent


@dataclass(frozen=True, slots=True)
class DriverChanged:
    """A driver's identity changed: module reloaded with another version, or a parent re-bound."""

    module: str
    old: DriverIdentity | None
    new: DriverIdentity | None


@dataclass(frozen=True, slots=True)
class Resynchronised:
    """Discovery re-read sysfs from scratch (start-up or a lost-event overflow)."""

    snapshot: HostSnapshot


DiscoveryEvent = (
    DeviceAdded
    | DeviceRemoved
    | ParentRegistered
    | ParentUnregistered
    | DriverChanged
    | Resynchronised
)
