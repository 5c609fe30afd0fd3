"""What a probe needs to know about one device: from the domain model, or read from sysfs with
discovery's reader."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..discovery import host_reader
from ..errors import InvalidArgumentError, NotFoundError
from ..hostpaths import MODULES_ROOT, SYSFS_ROOT
from ..model import Device, DeviceKind


@dataclass(frozen=True)
class ProbeTarget:
    """One device to probe: where it is in sysfs, what it is, and which IOMMU group holds it."""

    sysfs_path: Path
    device_id: str  # mdev UUID or PCI address
    kind: DeviceKind
    iommu_group: str | None
    parent_driver: str = ""  # module name of the parent's driver ("" when unknown)
    type_id: str = ""

    @classmethod
    def from_device(cls, device: Device) -> ProbeTarget:
        """The target for a discovered device. Raises nothing."""
        return cls(
            sysfs_path=Path(device.sysfs_path),
            device_id=device.device_id,
            kind=device.kind,
            iommu_group=device.iommu_group,
            parent_driver=device.driver.module if device.driver else "",
            type_id=device.type_id,
        )

    @classmethod
    def from_sysfs(
        cls,
        path: Path,
        sysfs_root: Path = SYSFS_ROOT,
        modules_root: Path = MODULES_ROOT,
        kernel_release: str | None = None,
    ) -> ProbeTarget:
        """Read a target from a device directory under *sysfs_root*, with discovery's reader
        (the same rules, links and driver identity as the daemon's).

        Raises :class:`NotFoundError` when *path* is not a directory and
        :class:`InvalidArgumentError` when it is not a VFIO device discovery knows (an mdev
        bound to its driver, a PCI function bound to vfio-pci or a variant of it, an NVIDIA
        virtual function with a vGPU profile set) or lies outside *sysfs_root*.
        """
        if not path.is_dir():
            raise NotFoundError(f"no device at {path}")
        reader = host_reader(sysfs_root, modules_root, kernel_release or os.uname().release)
        device = reader.read_device_path(path)
        if device is None:
            raise InvalidArgumentError(
                f"{path} is not a VFIO device under {sysfs_root}: bind it to vfio-pci (or its "
                "variant driver), or set a vGPU profile, and name it by UUID, PCI address or "
                "sysfs path"
            )
        return cls.from_device(device)

    def qemu_host(self, sysfs_root: Path) -> str | None:
        """The address QEMU's ``host=`` takes: a PCI function's, when the probe reads the
        host's own ``/sys`` (where QEMU looks the address up); ``None`` for an mdev or a
        function in another tree, which QEMU is given by ``sysfsdev=``."""
        if self.kind is not DeviceKind.PCI or sysfs_root != SYSFS_ROOT:
            return None
        return self.device_id

    @property
    def qemu_name(self) -> str:
        """The name QEMU gives the device in its messages (the sysfs directory's name)."""
        return self.sysfs_path.name
