"""Fixture hosts for umockdev: NVIDIA vGPU, Intel GVT-g, the kernel's mdev samples, VFIO PCI.

Two halves:

* :class:`HostBuilder` works on a ``UMockdev.Testbed`` in the current process and writes the sysfs
  layout the kernel has (parents, ``mdev_supported_types``, instances, ``/sys/module``), emitting
  the uevent sequences the kernel emits for each change. umockdev's ``Testbed.uevent`` resolves
  the device with libudev in the *calling* process, so that process must run under
  ``umockdev-wrapper``.
* :class:`MockHost` runs such a process (``umockdev-wrapper python umockdev_hosts.py``) from a test
  and drives it over a pipe with one JSON request per line.

umockdev delivers uevents through an ``AF_UNIX`` datagram socket that replaces the netlink socket
of every wrapped process, and aborts the sender when that socket's queue is full. The queue length
of such a socket is ``net.unix.max_dgram_qlen`` of the receiver's network namespace (10 by
default), so :meth:`MockHost.daemon_wrapper` starts the daemon in a network namespace of its own
with a long queue, as a real netlink socket with a large receive buffer would have.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DGRAM_QUEUE = 65536

# ---- what each fixture host has ---------------------------------------------------------------


@dataclass(frozen=True)
class TypeSpec:
    type_id: str
    name: str
    available: int
    description: str | None = None


@dataclass(frozen=True)
class ParentSpec:
    """One mdev parent and the module that drives it."""

    module: str
    name: str  # class/mdev_bus/<name>
    devpath: str  # /devices/...
    subsystem: str  # class (virtual parents) or bus (pci)
    types: tuple[TypeSpec, ...]
    mdev_driver: str
    version: str | None = None
    srcversion: str | None = None
    module_file: str = ""  # relative to /lib/modules/<release>
    pci_id: tuple[int, int] | None = None


def _sample(module: str, types: tuple[TypeSpec, ...], version: str | None = None) -> ParentSpec:
    return ParentSpec(
        module=module,
        name=module,
        devpath=f"/devices/virtual/{module}/{module}",
        subsystem=module,
        types=types,
        mdev_driver=module,
        version=version,
        srcversion="7E5B1A0C2D9F3E4B6A8C1D2" if version else None,
        module_file=f"updates/{module}.ko",
    )


MTTY = _sample(
    "mtty",
    (TypeSpec("mtty-1", "Single port serial", 24), TypeSpec("mtty-2", "Dual port serial", 12)),
    version="0.1",
)
MDPY = _sample(
    "mdpy",
    (
        TypeSpec("mdpy-vga", "vga", 4, "virtual display, 640x480, 32bpp"),
        TypeSpec("mdpy-xga", "xga", 4, "virtual display, 1024x768, 32bpp"),
        TypeSpec("mdpy-hd", "hd", 4, "virtual display, 1920x1080, 32bpp"),
    ),
)
MBOCHS = _sample(
    "mbochs",
    (
        TypeSpec("mbochs-small", "small", 64, "virtual display, 4 MB video memory"),
        TypeSpec("mbochs-medium", "medium", 16, "virtual display, 16 MB video memory"),
        TypeSpec("mbochs-large", "large", 4, "virtual display, 64 MB video memory"),
    ),
)
# NVIDIA vGPU on Ampere (an A10, 10de:2236) stays on mdev, also under vGPU 17 and later: types
# nvidia-NNN under the PF's mdev_supported_types, each with a name, a description of the form
# "num_heads=..., frl_config=..., framebuffer=..., max_resolution=..., max_instance=..." and
# available_instances; instances bound to nvidia-vgpu-vfio. Sources: NVIDIA's vGPU user guide
# (mdev on KVM, `mdevctl types`), NVIDIA/vgpu-device-manager (its mdev path for pre-Ada cards).
# The type ids are this fixture's (they are assigned per card model).
NVIDIA = ParentSpec(
    module="nvidia",
    name="0000:41:00.0",
    devpath="/devices/pci0000:40/0000:40:01.1/0000:41:00.0",
    subsystem="pci",
    types=tuple(
        TypeSpec(
            f"nvidia-{number}",
            f"NVIDIA A10-{profile}",
            count,
            f"num_heads=4, frl_config=60, framebuffer={fb}, max_resolution=5120x2880, "
            f"max_instance={count}",
        )
        for number, profile, fb, count in (
            (592, "1Q", "1024M", 24),
            (593, "2Q", "2048M", 12),
            (594, "4Q", "4096M", 6),
            (595, "8Q", "8192M", 3),
        )
    ),
    mdev_driver="nvidia-vgpu-vfio",
    version="550.54.14",
    srcversion="2D8E4F1B3A5C7D9E0F1A2B3",
    module_file="updates/dkms/nvidia.ko",
    pci_id=(0x10DE, 0x2236),
)
GVTG = ParentSpec(
    module="i915",
    name="0000:00:02.0",
    devpath="/devices/pci0000:00/0000:00:02.0",
    subsystem="pci",
    types=(
        TypeSpec(
            "i915-GVTg_V5_4",
            "GVTg_V5_4",
            2,
            "low_gm_size: 128MB\nhigh_gm_size: 512MB\nfence: 4\nresolution: 1920x1200\nweight: 4",
        ),
        TypeSpec(
            "i915-GVTg_V5_8",
            "GVTg_V5_8",
            4,
            "low_gm_size: 64MB\nhigh_gm_size: 384MB\nfence: 4\nresolution: 1024x768\nweight: 2",
        ),
    ),
    mdev_driver="vfio_mdev",
    module_file="kernel/drivers/gpu/drm/i915/i915.ko.xz",
    pci_id=(0x8086, 0x3E92),
)

PARENTS = {spec.module: spec for spec in (MTTY, MDPY, MBOCHS, NVIDIA, GVTG)}
# Type directory names sysfs may hold beyond the samples' plain ones: printable names with
# punctuation and spaces (taken everywhere), and one with a newline (refused everywhere).
# Not any driver's types: names a driver could register (the mdev core takes any kobject name,
# that is anything without a "/"), to hold every layer to one rule of what a type id may be.
ODD_TYPES: dict[str, tuple[TypeSpec, ...]] = {
    "mtty": (
        TypeSpec("type~1", "tilde", 2),
        TypeSpec("vgpu (A)", "spaces and parentheses", 2),
        TypeSpec("_x", "leading underscore", 2),
        TypeSpec("bad\nname", "a newline", 2),
    )
}
HOSTS: dict[str, tuple[str, ...]] = {
    "oddnames": ("mtty",),
    "samples": ("mtty", "mdpy", "mbochs"),
    "nvidia": ("nvidia",),
    "gvtg": ("i915",),
    "mtty": ("mtty",),
}


def _relative_link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- building and changing a host inside a Testbed ---------------------------------------------


@dataclass
class HostBuilder:
    """Writes fixture hosts into a Testbed and changes them the way the kernel does."""

    testbed: Any
    kernel_release: str = field(default_factory=lambda: os.uname().release)
    instances: dict[str, tuple[str, str]] = field(default_factory=dict)  # uuid -> module, type
    capacity: dict[str, int] = field(default_factory=dict)  # type id -> available override
    next_group: int = 0
    module_builds: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    extra_types: dict[str, tuple[TypeSpec, ...]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.testbed.get_root_dir())

    @property
    def sys(self) -> Path:
        return Path(self.testbed.get_sys_dir())

    @property
    def modules_root(self) -> Path:
        return self.root / "lib" / "modules"

    def at(self, devpath: str) -> Path:
        return self.sys / devpath.lstrip("/")

    def uevent(self, devpath: str, action: str, extra: str = "") -> None:
        """Emit a uevent; *extra* properties are in the device's ``uevent`` file for this one."""
        uevent_file = self.at(devpath) / "uevent"
        base = uevent_file.read_text() if uevent_file.exists() else ""
        if extra:
            uevent_file.write_text(base + extra)
        self.testbed.uevent(f"/sys{devpath}", action)
        if extra:
            uevent_file.write_text(base)

    # ---- modules ------------------------------------------------------------------------------

    def _write_module(self, spec: ParentSpec, version: str | None) -> None:
        module_dir = self.sys / "module" / spec.module
        module_dir.mkdir(parents=True, exist_ok=True)
        _write(module_dir / "initstate", "live\n")
        _write(module_dir / "refcnt", "0\n")
        for name in ("version", "srcversion"):
            (module_dir / name).unlink(missing_ok=True)
        build = self.module_builds.get(spec.module, 0) + 1
        self.module_builds[spec.module] = build
        if version is not None:
            _write(module_dir / "version", version + "\n")
        if spec.srcversion is not None:
            digest = hashlib.sha256(f"{spec.module}-{version}-{build}".encode()).hexdigest()
            _write(module_dir / "srcversion", digest[:23].upper() + "\n")
        # The module file, listed in modules.dep as depmod would.
        release_dir = self.modules_root / self.kernel_release
        module_file = release_dir / spec.module_file
        _write(module_file, f"\x7fELF fixture module {spec.module} build {build}\n")
        dep = release_dir / "modules.dep"
        lines = dep.read_text().splitlines() if dep.exists() else []
        entry = f"{spec.module_file}: kernel/drivers/vfio/mdev/mdev.ko"
        if entry not in lines:
            lines.append(entry)
        dep.write_text("\n".join(lines) + "\n")
        self.versions[spec.module] = version

    def _write_driver(self, bus: str, driver: str, module: str) -> Path:
        driver_dir = self.sys / "bus" / bus / "drivers" / driver
        driver_dir.mkdir(parents=True, exist_ok=True)
        _relative_link(driver_dir / "module", self.sys / "module" / module)
        return driver_dir

    # ---- parents ------------------------------------------------------------------------------

    def _write_parent_device(self, spec: ParentSpec) -> Path:
        device = self.at(spec.devpath)
        device.mkdir(parents=True, exist_ok=True)
        if spec.subsystem == "pci":
            assert spec.pci_id is not None
            vendor, device_id = spec.pci_id
            _write(device / "vendor", f"0x{vendor:04x}\n")
            _write(device / "device", f"0x{device_id:04x}\n")
            _write(device / "class", "0x030000\n")
            _write(
                device / "uevent",
                f"PCI_ID={vendor:04X}:{device_id:04X}\nPCI_SLOT_NAME={spec.name}\n",
            )
            _relative_link(device / "subsystem", self.sys / "bus" / "pci")
            _relative_link(self.sys / "bus" / "pci" / "devices" / spec.name, device)
        else:
            _write(device / "uevent", "")
            _relative_link(device / "subsystem", self.sys / "class" / spec.subsystem)
            _relative_link(self.sys / "class" / spec.subsystem / spec.name, device)
        return device

    def _bind_parent(self, spec: ParentSpec) -> None:
        if spec.subsystem != "pci":
            return
        driver_dir = self._write_driver("pci", spec.module, spec.module)
        device = self.at(spec.devpath)
        _relative_link(device / "driver", driver_dir)
        _relative_link(driver_dir / spec.name, device)
        _write(device / "uevent", (device / "uevent").read_text() + f"DRIVER={spec.module}\n")

    def _types(self, spec: ParentSpec) -> tuple[TypeSpec, ...]:
        return spec.types + self.extra_types.get(spec.module, ())

    def _write_types(self, spec: ParentSpec) -> None:
        types_dir = self.at(spec.devpath) / "mdev_supported_types"
        for mdev_type in self._types(spec):
            type_dir = types_dir / mdev_type.type_id
            (type_dir / "devices").mkdir(parents=True, exist_ok=True)
            _write(type_dir / "name", mdev_type.name + "\n")
            _write(type_dir / "device_api", "vfio-pci\n")
            available = self.capacity.get(mdev_type.type_id, mdev_type.available)
            _write(type_dir / "available_instances", f"{available}\n")
            _write(type_dir / "create", "")
            if mdev_type.description is not None:
                _write(type_dir / "description", mdev_type.description + "\n")

    def register_parent(self, module: str) -> None:
        """The driver registers its device with mdev: types appear, ``MDEV_STATE=registered``."""
        spec = PARENTS[module]
        self._write_types(spec)
        _relative_link(self.sys / "class" / "mdev_bus" / spec.name, self.at(spec.devpath))
        self.uevent(spec.devpath, "change", "MDEV_STATE=registered\n")

    def unregister_parent(self, module: str) -> None:
        """The driver unregisters: its instances go first, then ``MDEV_STATE=unregistered``."""
        spec = PARENTS[module]
        for uuid in [u for u, (m, _) in self.instances.items() if m == module]:
            self.remove_instance(uuid)
        (self.sys / "class" / "mdev_bus" / spec.name).unlink(missing_ok=True)
        self.uevent(spec.devpath, "change", "MDEV_STATE=unregistered\n")
        shutil.rmtree(self.at(spec.devpath) / "mdev_supported_types", ignore_errors=True)

    def load_module(self, module: str, version: str | None = None) -> None:
        """``modprobe``: the module's sysfs entry, its parent device, registration, ``add`` of
        the module, in the kernel's order (samples: parent ``add``, ``change`` registered,
        ``add /module/<m>``; PCI drivers: ``bind`` of the parent, registration, module)."""
        spec = PARENTS[module]
        self._write_module(spec, version if version is not None else spec.version)
        if spec.subsystem == "pci":
            self._write_driver("mdev", spec.mdev_driver, spec.module)
            if not self.at(spec.devpath).exists():
                self._write_parent_device(spec)
                self.uevent(spec.devpath, "add")
            self._bind_parent(spec)
            self.uevent(spec.devpath, "bind")
        else:
            self._write_driver("mdev", spec.mdev_driver, spec.module)
            self._write_parent_device(spec)
            self.uevent(spec.devpath, "add")
        self.register_parent(module)
        self.testbed.uevent(f"/sys/module/{module}", "add")

    def unload_module(self, module: str) -> None:
        """``rmmod``: instances removed, ``change`` unregistered, parent ``remove`` (or
        ``unbind`` for a PCI parent), ``remove /module/<m>``."""
        spec = PARENTS[module]
        self.unregister_parent(module)
        device = self.at(spec.devpath)
        if spec.subsystem == "pci":
            uevent_file = device / "uevent"
            self.uevent(spec.devpath, "unbind")
            (device / "driver").unlink(missing_ok=True)
            uevent_file.write_text(
                "".join(
                    f"{line}\n"
                    for line in uevent_file.read_text().splitlines()
                    if not line.startswith("DRIVER=")
                )
            )
        else:
            self.uevent(spec.devpath, "remove")
            (self.sys / "class" / spec.subsystem / spec.name).unlink(missing_ok=True)
            shutil.rmtree(device, ignore_errors=True)
        shutil.rmtree(self.sys / "bus" / "mdev" / "drivers" / spec.mdev_driver, ignore_errors=True)
        self.testbed.uevent(f"/sys/module/{module}", "remove")
        shutil.rmtree(self.sys / "module" / module, ignore_errors=True)
        if spec.subsystem == "pci":
            shutil.rmtree(self.sys / "bus" / "pci" / "drivers" / spec.module, ignore_errors=True)

    def reload_module(self, module: str, version: str | None = None) -> None:
        """Unload and load again; a module without a version gets another file (fingerprint)."""
        self.unload_module(module)
        self.load_module(module, version)

    def build(self, host: str, capacity: dict[str, int] | None = None) -> None:
        """Write one of :data:`HOSTS` (``samples``, ``nvidia``, ``gvtg``, ``mtty``,
        ``oddnames``) or ``pci``."""
        self.capacity.update(capacity or {})
        for directory in ("bus/mdev/devices", "bus/pci/devices", "class/mdev_bus", "module"):
            (self.sys / directory).mkdir(parents=True, exist_ok=True)
        if host == "pci":
            self.add_pci_functions()
            return
        if host == "oddnames":
            self.extra_types.update(ODD_TYPES)
        for module in HOSTS[host]:
            self.load_module(module)

    # ---- instances ----------------------------------------------------------------------------

    def _type_dir(self, spec: ParentSpec, type_id: str) -> Path:
        return self.at(spec.devpath) / "mdev_supported_types" / type_id

    def _adjust_available(self, spec: ParentSpec, type_id: str, delta: int) -> None:
        path = self._type_dir(spec, type_id) / "available_instances"
        path.write_text(f"{int(path.read_text()) + delta}\n")

    def add_instance(
        self,
        module: str,
        type_id: str,
        uuid: str | None = None,
        deferred: list[tuple[str, str]] | None = None,
    ) -> str:
        """``echo UUID > create``: ``add`` mdev, ``add`` vfio group, ``add`` vfio-dev, ``bind``.

        With *deferred*, the uevents are appended there instead of sent (for a burst)."""

        def emit(devpath: str, action: str) -> None:
            if deferred is None:
                self.uevent(devpath, action)
            else:
                deferred.append((devpath, action))

        spec = PARENTS[module]
        uuid = uuid or str(uuidlib.uuid4())
        parent = self.at(spec.devpath)
        device = parent / uuid
        devpath = f"{spec.devpath}/{uuid}"
        device.mkdir()
        _write(device / "uevent", "")
        _write(device / "remove", "")
        _relative_link(device / "subsystem", self.sys / "bus" / "mdev")
        _relative_link(device / "mdev_type", self._type_dir(spec, type_id))
        _relative_link(self._type_dir(spec, type_id) / "devices" / uuid, device)
        _relative_link(self.sys / "bus" / "mdev" / "devices" / uuid, device)
        self._adjust_available(spec, type_id, -1)
        emit(devpath, "add")
        group = str(self.next_group)
        self.next_group += 1
        group_dir = self.sys / "kernel" / "iommu_groups" / group
        _relative_link(group_dir / "devices" / uuid, device)
        _relative_link(device / "iommu_group", group_dir)
        vfio = self.sys / "devices" / "virtual" / "vfio" / group
        vfio.mkdir(parents=True)
        _write(vfio / "uevent", f"MAJOR=243\nMINOR={group}\nDEVNAME=vfio/{group}\n")
        _relative_link(vfio / "subsystem", self.sys / "class" / "vfio")
        emit(f"/devices/virtual/vfio/{group}", "add")
        vfio_dev = device / "vfio-dev" / "vfio0"
        vfio_dev.mkdir(parents=True)
        _write(vfio_dev / "uevent", "MAJOR=511\nMINOR=0\nDEVNAME=vfio/devices/vfio0\n")
        _relative_link(vfio_dev / "subsystem", self.sys / "class" / "vfio-dev")
        emit(f"{devpath}/vfio-dev/vfio0", "add")
        driver_dir = self.sys / "bus" / "mdev" / "drivers" / spec.mdev_driver
        _relative_link(device / "driver", driver_dir)
        _write(device / "uevent", f"DRIVER={spec.mdev_driver}\n")
        emit(devpath, "bind")
        self.instances[uuid] = (module, type_id)
        return uuid

    def storm(self, module: str, type_id: str, count: int) -> dict[str, Any]:
        """Create *count* instances, then send all their uevents back to back, in order.

        Returns the UUIDs and the wall-clock times the burst of uevents began and ended."""
        deferred: list[tuple[str, str]] = []
        uuids = [self.add_instance(module, type_id, deferred=deferred) for _ in range(count)]
        began = time.time()
        for devpath, action in deferred:
            self.testbed.uevent(f"/sys{devpath}", action)
        return {"uuids": uuids, "began": began, "ended": time.time()}

    def remove_instance(self, uuid: str) -> None:
        """``echo 1 > remove``: ``remove`` vfio-dev, ``remove`` group, ``unbind``, ``remove``."""
        module, type_id = self.instances.pop(uuid)
        spec = PARENTS[module]
        device = self.at(spec.devpath) / uuid
        devpath = f"{spec.devpath}/{uuid}"
        group = os.readlink(device / "iommu_group").rsplit("/", 1)[-1]
        self.uevent(f"{devpath}/vfio-dev/vfio0", "remove")
        shutil.rmtree(device / "vfio-dev")
        self.uevent(f"/devices/virtual/vfio/{group}", "remove")
        shutil.rmtree(self.sys / "devices" / "virtual" / "vfio" / group)
        shutil.rmtree(self.sys / "kernel" / "iommu_groups" / group)
        self.uevent(devpath, "unbind")
        (device / "driver").unlink()
        _write(device / "uevent", "")
        self.uevent(devpath, "remove")
        (self.sys / "bus" / "mdev" / "devices" / uuid).unlink()
        (self._type_dir(spec, type_id) / "devices" / uuid).unlink()
        shutil.rmtree(device)
        self._adjust_available(spec, type_id, +1)

    def answer_writes(self) -> int:
        """Act on UUIDs written to ``create`` and ``1`` written to ``remove``, as mdev does.

        Returns how many writes were answered."""
        answered = 0
        for module, spec in PARENTS.items():
            types_dir = self.at(spec.devpath) / "mdev_supported_types"
            if not types_dir.is_dir():
                continue
            for mdev_type in self._types(spec):
                create = types_dir / mdev_type.type_id / "create"
                try:
                    written = create.read_text().strip()
                except OSError:
                    continue
                if written:
                    _write(create, "")
                    self.add_instance(module, mdev_type.type_id, uuid=written)
                    answered += 1
        for uuid, (module, _) in list(self.instances.items()):
            remove = self.at(PARENTS[module].devpath) / uuid / "remove"
            try:
                if remove.read_text().strip() == "1":
                    self.remove_instance(uuid)
                    answered += 1
            except OSError:
                continue
        return answered

    # ---- VFIO PCI functions -------------------------------------------------------------------

    def add_pci_functions(self) -> None:
        """A NIC function bound to ``vfio-pci`` and an NVIDIA SR-IOV VF with a vGPU type."""
        self._write_module(
            ParentSpec("vfio_pci", "", "", "pci", (), "", module_file="kernel/vfio-pci.ko"),
            None,
        )
        self._write_module(NVIDIA, NVIDIA.version)
        for address, vendor, device_id, driver, module, physfn in (
            ("0000:65:00.4", 0x8086, 0x1520, "vfio-pci", "vfio_pci", None),
            ("0000:41:00.4", 0x10DE, 0x2236, "nvidia", "nvidia", "0000:41:00.0"),
            ("0000:66:00.0", 0x8086, 0x1521, "igb", None, None),
        ):
            bridge = f"/devices/pci0000:{address[5:7]}/0000:{address[5:7]}:01.0"
            devpath = f"{bridge}/{address}"
            device = self.at(devpath)
            device.mkdir(parents=True)
            _write(device / "vendor", f"0x{vendor:04x}\n")
            _write(device / "device", f"0x{device_id:04x}\n")
            _write(device / "uevent", f"DRIVER={driver}\nPCI_SLOT_NAME={address}\n")
            _relative_link(device / "subsystem", self.sys / "bus" / "pci")
            _relative_link(self.sys / "bus" / "pci" / "devices" / address, device)
            group_dir = self.sys / "kernel" / "iommu_groups" / f"9{self.next_group}"
            self.next_group += 1
            _relative_link(group_dir / "devices" / address, device)
            _relative_link(device / "iommu_group", group_dir)
            driver_dir = self.sys / "bus" / "pci" / "drivers" / driver
            driver_dir.mkdir(parents=True, exist_ok=True)
            if module is not None:
                _relative_link(driver_dir / "module", self.sys / "module" / module)
            _relative_link(device / "driver", driver_dir)
            if physfn is not None:
                _relative_link(device / "physfn", self.sys / "bus" / "pci" / "devices" / physfn)
                _write(device / "nvidia" / "current_vgpu_type", "594\n")
            self.uevent(devpath, "add")
            self.uevent(devpath, "bind")

    def rebind_pci(self, address: str, driver: str, module: str | None = None) -> None:
        """``driver_override`` and a re-probe: ``unbind`` from the old driver, ``bind`` to *driver*
        (provided by *module*, which must be loaded; ``None``: built in)."""
        device = (self.sys / "bus" / "pci" / "devices" / address).resolve()
        devpath = "/" + str(device.relative_to(self.sys))
        uevent_file = device / "uevent"
        kept = [x for x in uevent_file.read_text().splitlines() if not x.startswith("DRIVER=")]
        (device / "driver").unlink(missing_ok=True)
        uevent_file.write_text("".join(f"{line}\n" for line in kept))
        self.uevent(devpath, "unbind")
        driver_dir = self.sys / "bus" / "pci" / "drivers" / driver
        driver_dir.mkdir(parents=True, exist_ok=True)
        if module is not None:
            _relative_link(driver_dir / "module", self.sys / "module" / module)
        _relative_link(device / "driver", driver_dir)
        uevent_file.write_text(f"DRIVER={driver}\n" + "".join(f"{line}\n" for line in kept))
        self.uevent(devpath, "bind")


class DirectoryTestbed:
    """A plain directory in the shape of a Testbed, for in-process tests without umockdev: the
    uevents are recorded (with the properties the device's ``uevent`` file holds at that
    moment, as umockdev sends them) instead of sent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sys").mkdir(parents=True, exist_ok=True)
        self.uevents: list[dict[str, str]] = []

    def get_root_dir(self) -> str:
        return str(self.root)

    def get_sys_dir(self) -> str:
        return str(self.root / "sys")

    def uevent(self, syspath: str, action: str) -> None:
        devpath = syspath.removeprefix("/sys")
        device = self.root / "sys" / devpath.lstrip("/")
        subsystem = "module" if devpath.startswith("/module/") else ""
        if not subsystem:
            subsystem = os.readlink(device / "subsystem").rsplit("/", 1)[-1]
        properties = {"ACTION": action, "DEVPATH": devpath, "SUBSYSTEM": subsystem}
        uevent_file = device / "uevent"
        if uevent_file.exists():
            for line in uevent_file.read_text().splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    properties[key] = value
        properties["SEQNUM"] = str(len(self.uevents) + 1)
        self.uevents.append(properties)


# ---- the wrapped process and its client --------------------------------------------------------


def serve(
    stdin: Iterator[str], stdout: Any, builder_class: type[HostBuilder] = HostBuilder
) -> None:
    """Run a Testbed and a :class:`HostBuilder` (or *builder_class*); answer one JSON request
    per line; remove the Testbed's directory when *stdin* closes."""
    import gi

    gi.require_version("UMockdev", "1.0")
    from gi.repository import UMockdev

    testbed = UMockdev.Testbed.new()
    root = Path(testbed.get_root_dir())
    try:
        _host(builder_class(testbed), stdin, stdout)
    finally:
        # The Testbed removes its directory when it is finalized, which interpreter exit does
        # not do: drop the last reference now, and remove whatever is left all the same.
        del testbed
        gc.collect()
        shutil.rmtree(root, ignore_errors=True)


def _host(builder: HostBuilder, stdin: Iterator[str], stdout: Any) -> None:
    """Say where the host is, then answer requests (and the daemon's writes) until *stdin* ends."""
    (builder.sys / "class" / "mdev_bus").mkdir(parents=True, exist_ok=True)
    hello = {"root": str(builder.root), "modules_root": str(builder.modules_root)}
    stdout.write(json.dumps(hello) + "\n")
    stdout.flush()
    lock = threading.Lock()
    stop = threading.Event()

    def kernel() -> None:
        """Answer the daemon's writes to ``create``/``remove`` while the host runs."""
        while not stop.wait(0.02):
            with lock:
                try:
                    builder.answer_writes()
                except (OSError, KeyError, ValueError) as err:
                    sys.stderr.write(f"umockdev host: answering a write failed: {err}\n")

    answering = threading.Thread(target=kernel, daemon=True)
    answering.start()
    try:
        _answer(stdin, stdout, builder, lock)
    finally:
        stop.set()
        answering.join()


def _answer(stdin: Iterator[str], stdout: Any, builder: HostBuilder, lock: threading.Lock) -> None:
    """Answer one JSON request per line of *stdin* until it closes."""
    for line in stdin:
        request = json.loads(line)
        operation = request.pop("op")
        started = time.monotonic()
        with lock:
            try:
                result = getattr(builder, operation)(**request)
                reply = {"ok": True, "result": result, "seconds": time.monotonic() - started}
            except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


@dataclass
class MockHost:
    """A wrapped process holding a Testbed, driven from the test process."""

    process: subprocess.Popen[str] | None = None
    root: Path = Path("/nonexistent")
    modules_root: Path = Path("/nonexistent")
    last_seconds: float = 0.0

    def command(self) -> list[str]:
        """The program the wrapped process runs (this module; subclasses may extend it)."""
        return [sys.executable, str(Path(__file__).resolve())]

    def start(self) -> MockHost:
        env = {k: v for k, v in os.environ.items() if k != "UMOCKDEV_DIR"}
        self.process = subprocess.Popen(
            ["umockdev-wrapper", *self.command()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        hello = json.loads(self.process.stdout.readline())
        self.root = Path(hello["root"])
        self.modules_root = Path(hello["modules_root"])
        return self

    def call(self, op: str, **arguments: Any) -> Any:
        """Run one :class:`HostBuilder` method in the wrapped process."""
        assert self.process is not None
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the testbed process died ({self.process.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"testbed {op} failed: {reply['error']}")
        self.last_seconds = reply["seconds"]
        return reply["result"]

    def build(self, host: str, capacity: dict[str, int] | None = None) -> None:
        self.call("build", host=host, capacity=capacity)

    def add_instance(self, module: str, type_id: str, uuid: str | None = None) -> str:
        return str(self.call("add_instance", module=module, type_id=type_id, uuid=uuid))

    def remove_instance(self, uuid: str) -> None:
        self.call("remove_instance", uuid=uuid)

    def register_parent(self, module: str) -> None:
        self.call("register_parent", module=module)

    def rebind_pci(self, address: str, driver: str, module: str | None = None) -> None:
        self.call("rebind_pci", address=address, driver=driver, module=module)

    def unregister_parent(self, module: str) -> None:
        self.call("unregister_parent", module=module)

    def reload_module(self, module: str, version: str | None = None) -> None:
        self.call("reload_module", module=module, version=version)

    def storm(self, module: str, type_id: str, count: int) -> dict[str, Any]:
        return dict(self.call("storm", module=module, type_id=type_id, count=count))

    def daemon_env(self) -> dict[str, str]:
        return {"UMOCKDEV_DIR": str(self.root)}

    def daemon_args(self) -> list[str]:
        return ["--modules-root", str(self.modules_root)]

    @staticmethod
    def probe_env_args() -> list[str]:
        """A wrapped daemon's probe QEMU must see the same emulated sysfs: umockdev-wrapper's
        preload and the testbed, passed on explicitly (the daemon passes nothing by itself)."""
        return ["--probe-env", "UMOCKDEV_DIR", "--probe-env", "LD_PRELOAD"]

    @staticmethod
    def daemon_wrapper(queue: int = DGRAM_QUEUE) -> Sequence[str]:
        """``unshare`` a network namespace with a long datagram queue, then ``umockdev-wrapper``."""
        script = f'echo {queue} > /proc/sys/net/unix/max_dgram_qlen && exec "$@"'
        return ["unshare", "--net", "sh", "-c", script, "sh", "umockdev-wrapper"]

    def stop(self) -> None:
        """End the wrapped process; its Testbed directory goes with it (removed here when the
        process could not remove it itself)."""
        if self.process is not None:
            if self.process.poll() is None:
                assert self.process.stdin is not None
                self.process.stdin.close()
                try:
                    self.process.wait(30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        if self.root != Path("/nonexistent"):
            shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    serve(iter(sys.stdin.readline, ""), sys.stdout)
