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


# MdevType.requires of a MIG-backed vGPU profile: MIG mode and a GPU instance must exist first.
NEEDS_GPU_INSTANCE = "gpu-instance"


class TypeKind(enum.Enum):
    """What a type is: how its devices come to exist and how one is made for a probe.

    ``mdev``: an entry of a parent's ``mdev_supported_types``; an instance is created through
    its ``create`` attribute. ``vf-profile``: an SR-IOV vGPU profile that the virtual functions
    of a physical function can take (NVIDIA ``nvidia/creatable_vgpu_types``); a free VF takes
    it when its id is written to ``nvidia/current_vgpu_type``. ``pci``: the type of a VFIO PCI
    function that exists as it is (``vfio-pci`` or a variant driver such as ``mlx5_vfio_pci``
    or ``xe-vfio-pci``), keyed by ``vendor:device``; nothing can be created.
    """

    MDEV = "mdev"
    VF_PROFILE = "vf-profile"
    PCI = "pci"


@dataclass(frozen=True, slots=True)
class Parent:
    """A device that offers types: an mdev parent (``/sys/class/mdev_bus/<name>``), or an
    SR-IOV physical function whose virtual functions offer vGPU profiles (named by its PCI
    address; ``subsystem`` is ``pci``)."""

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
    """One type a parent offers: an entry of its ``mdev_supported_types``, or (``kind``
    ``vf-profile``) a vGPU profile its virtual functions can take.

    For a profile, ``type_id`` is the profile's numeric id as ``current_vgpu_type`` takes it,
    and ``available_instances`` the number of the parent's VFs that can take it now (they list
    it in ``creatable_vgpu_types`` and have no profile set); a profile once listed stays
    known with ``0`` while the card has no room for it (homogeneous narrowing, a full card).
    ``requires`` names what must exist before an instance can be made and vfiocapsd does not
    make itself (``gpu-instance``: a MIG-backed profile); empty when nothing is missing.
    """

    parent: str
    type_id: str
    name: str
    description: str
    device_api: str
    available_instances: int
    kind: TypeKind = TypeKind.MDEV
    requires: str = ""


@dataclass(frozen=True, slots=True)
class Device:
    """A VFIO device that a VM could be given: an mdev instance or a VFIO PCI function.

    ``device_id`` is the UUID for an mdev and the PCI address (``0000:65:00.4``) for a PCI
    device. For a PCI device, ``type_id`` is the vGPU profile where one is set (NVIDIA SR-IOV
    ``nvidia/current_vgpu_type``), else ``vendor:device``; ``parent`` is the physical function
    of a virtual function. ``parent_version`` says which driver (and firmware, where sysfs
    shows it) serves the physical function of a VF bound to a VFIO driver, e.g.
    ``mlx5_core 6.12.0 fw 22.36.1010``: the VF's behaviour depends on it too. ``sysfs_path``
    is the resolved device directory, kept as a string: a host can have many thousands of
    devices.
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
    parent_version: str = ""


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """Everything discovery knows at one moment.

    ``functions`` maps each virtual function of a parent with vGPU profiles to that parent.
    """

    parents: dict[str, Parent] = field(default_factory=dict)
    types: dict[tuple[str, str], MdevType] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    functions: dict[str, str] = field(default_factory=dict)


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
