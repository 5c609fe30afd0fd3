"""What a probe needs to know about one device, from the domain model or straight from sysfs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError, NotFoundError
from ..model import Device, DeviceKind

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
PCI_ADDRESS_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
SYSTEM_SYSFS = Path("/sys")


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
    def from_sysfs(cls, path: Path) -> ProbeTarget:
        """Read a target from a device directory in sysfs (an mdev or a PCI function).

        Raises :class:`NotFoundError` when *path* is not a device directory and
        :class:`InvalidArgumentError` when it is neither an mdev nor a PCI function.
        """
        if not path.is_dir():
            raise NotFoundError(f"no device at {path}")
        real = path.resolve()
        name = real.name
        subsystem = _link_name(path / "subsystem")
        if subsystem == "mdev" or UUID_RE.match(name):
            kind = DeviceKind.MDEV
            type_id = _link_name(path / "mdev_type")
            parent_driver = _driver_module(real.parent / "driver") or _driver_module(
                path / "driver"
            )
        elif subsystem == "pci" or PCI_ADDRESS_RE.match(name):
            kind = DeviceKind.PCI
            type_id = _read(path / "nvidia" / "current_vgpu_type") or _pci_id(path)
            parent_driver = _driver_module(path / "driver")
        else:
            raise InvalidArgumentError(f"{path} is neither an mdev nor a PCI device")
        return cls(
            sysfs_path=path,
            device_id=name,
            kind=kind,
            iommu_group=_link_name(path / "iommu_group") or None,
            parent_driver=parent_driver,
            type_id=type_id,
        )

    def qemu_host(self, sysfs_root: Path) -> str | None:
        """The address QEMU's ``host=`` takes: a PCI function's, when the probe reads the
        host's own ``/sys`` (where QEMU looks the address up); ``None`` for an mdev or a
        function in another tree, which QEMU is given by ``sysfsdev=``."""
        if self.kind is not DeviceKind.PCI or sysfs_root != SYSTEM_SYSFS:
            return None
        return self.device_id

    @property
    def qemu_name(self) -> str:
        """The name QEMU gives the device in its messages (the sysfs directory's name)."""
        return self.sysfs_path.name


def _link_name(link: Path) -> str:
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return ""


def _driver_module(driver_link: Path) -> str:
    """The module behind a ``driver`` link (its ``module`` link), else the driver's name."""
    return _link_name(driver_link / "module") or _link_name(driver_link)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _pci_id(path: Path) -> str:
    vendor, device = _read(path / "vendor"), _read(path / "device")
    if not vendor or not device:
        return ""
    return f"{vendor.removeprefix('0x')}:{device.removeprefix('0x')}"
