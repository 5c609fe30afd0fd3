"""Fixture hosts with SR-IOV virtual functions for umockdev: vGPU profiles and variant drivers.

Each spec below names the public source its layout follows. In short:

* NVIDIA vGPU 17 and later on Ada and Hopper (H100, L40S: SR-IOV, no mdev). Sources: NVIDIA's
  vendor-VFIO host driver source (``nv_vfio_pci_core_init``, ``creatable_vgpu_types_show``,
  ``current_vgpu_type_store``), NVIDIA/vgpu-device-manager ``pkg/vgpu/vfio``,
  NVIDIA/kubevirt-gpu-device-plugin ``pkg/device_plugin/vfio_vgpu.go`` and its README ("vGPU
  profile timing"), the nvidia-vgpu VFIO RFCs (2024, 2025). The PF and every VF are bound to
  ``nvidia``; nvidia.ko registers every VF with vfio-pci-core, so each VF has
  ``vfio-dev/vfioN`` with or without a profile. ``nvidia/creatable_vgpu_types`` is a heading
  ``ID    : vGPU Name`` and one ``%-5d : %s`` line per profile, empty past the heading on a VF
  that carries one; once a profile is set the card is homogeneous (siblings list only it while
  there is room) and a full card lists the heading alone. ``nvidia/current_vgpu_type`` holds
  ``%d`` (``0``: none). ``gpu_instance_id``, ``placement_id``, ``vgpu_params`` and
  ``warm_update`` sit beside them. **No uevent is sent when a profile is set or cleared**
  (neither source calls kobject_uevent; NVIDIA's plugin rescans periodically), so this fixture
  sends none either. The driver refuses writes with -EBUSY, -ENODEV, -EINVAL, -ENOSPC or -EPERM;
  a plain file cannot fail a write, so this emulated driver refuses by restoring the old value.
* ``xe-vfio-pci`` VFs of an Intel BMG card (``8086:e211``; Linux 6.19 ``drivers/vfio/pci/xe``,
  ``include/drm/intel/pciids.h``): PF on ``xe``, VFs on ``xe-vfio-pci`` (module
  ``xe_vfio_pci``, no MODULE_VERSION), ``vfio-dev`` on each.
* An mlx5 VF (ConnectX-7 PF ``15b3:1021``, VF ``15b3:101e``; ``drivers/vfio/pci/mlx5``): PF on
  ``mlx5_core`` with its firmware in ``infiniband/mlx5_0/fw_ver``, VF on ``mlx5_vfio_pci``.

Enabling VFs sends ``add`` and ``bind`` for each VF, then ``change`` on the physical function;
disabling sends ``unbind`` and ``remove`` for each VF, then ``change`` (``drivers/pci/iov.c``).
A write of vfiocapsd's own is answered by a poller a few milliseconds later (a real driver
answers within the write).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .umockdev_hosts import (
    DirectoryTestbed,
    HostBuilder,
    MockHost,
    ParentSpec,
    _relative_link,
    _write,
    serve,
)

HEADING = "ID    : vGPU Name\n"


@dataclass(frozen=True)
class ProfileSpec:
    number: str
    name: str
    per_gpu: int  # how many VFs of one GPU may carry it


def _profile_line(number: str, name: str) -> str:
    """One line of ``creatable_vgpu_types``: ``"%-5d : %s"``."""
    return f"{number:<5} : {name}\n"


@dataclass(frozen=True)
class FunctionSpec:
    """A physical function, its driver, and what its virtual functions are bound to."""

    key: str
    address: str
    pci_id: tuple[int, int]
    vf_device: int
    pf_module: ParentSpec  # the module (version rule) of the physical function's driver
    pf_driver: str
    vf_module: ParentSpec
    vf_driver: str
    vf_count: int
    total_vfs: int
    profiles: tuple[ProfileSpec, ...] = ()
    firmware: str | None = None
    vfio_bound: bool = False  # VFs registered with vfio-pci-core (they have vfio-dev)

    @property
    def bus(self) -> str:
        return self.address[5:7]

    @property
    def devpath(self) -> str:
        return f"/devices/pci0000:{self.bus}/0000:{self.bus}:01.0/{self.address}"

    def vf_address(self, index: int) -> str:
        """VFs follow the PF at offset 4 (functions .4 to .7, then the next device)."""
        number = 4 + index
        return f"{self.address[:8]}{number // 8:02x}.{number % 8}"


def _module(name: str, version: str | None, module_file: str, srcversion: bool) -> ParentSpec:
    return ParentSpec(
        module=name,
        name="",
        devpath="",
        subsystem="pci",
        types=(),
        mdev_driver="",
        version=version,
        srcversion="0" if srcversion else None,
        module_file=module_file,
    )


NVIDIA_MODULE = _module("nvidia", "570.133.10", "updates/dkms/nvidia.ko", True)
# H100 PCIe (10de:2331). Profile names follow NVIDIA's naming (<model>-<framebuffer GB><series>,
# MIG-backed <model>-<slices>-<GB><series>); the ids are this fixture's, as ids are assigned
# per card model (the same id means another profile on another model: see L40S).
H100 = FunctionSpec(
    key="h100",
    address="0000:41:00.0",
    pci_id=(0x10DE, 0x2331),
    vf_device=0x2331,
    pf_module=NVIDIA_MODULE,
    pf_driver="nvidia",
    vf_module=NVIDIA_MODULE,
    vf_driver="nvidia",
    vf_count=4,
    total_vfs=32,
    profiles=(
        ProfileSpec("1060", "NVIDIA H100-20C", 4),
        ProfileSpec("1061", "NVIDIA H100-40C", 2),
        ProfileSpec("1062", "NVIDIA H100-80C", 1),
        ProfileSpec("1070", "NVIDIA H100-1-10C", 7),
    ),
    vfio_bound=True,
)
# L40S (10de:26b9); "1145 : NVIDIA L40S-1B" as the vendor driver prints it. Id 1061 is given
# to an L40S profile on purpose: the same id names unrelated profiles on two models.
L40S = FunctionSpec(
    key="l40s",
    address="0000:c1:00.0",
    pci_id=(0x10DE, 0x26B9),
    vf_device=0x26B9,
    pf_module=NVIDIA_MODULE,
    pf_driver="nvidia",
    vf_module=NVIDIA_MODULE,
    vf_driver="nvidia",
    vf_count=4,
    total_vfs=32,
    profiles=(
        ProfileSpec("1061", "NVIDIA L40S-24Q", 2),
        ProfileSpec("1145", "NVIDIA L40S-1B", 32),
    ),
    vfio_bound=True,
)
XE = FunctionSpec(
    key="xe",
    address="0000:03:00.0",
    pci_id=(0x8086, 0xE211),
    vf_device=0xE211,
    pf_module=_module("xe", None, "kernel/drivers/gpu/drm/xe/xe.ko.xz", False),
    pf_driver="xe",
    vf_module=_module("xe_vfio_pci", None, "kernel/drivers/vfio/pci/xe/xe-vfio-pci.ko.xz", True),
    vf_driver="xe-vfio-pci",
    vf_count=2,
    total_vfs=24,
    vfio_bound=True,
)
MLX5 = FunctionSpec(
    key="mlx5",
    address="0000:5e:00.0",
    pci_id=(0x15B3, 0x1021),
    vf_device=0x101E,
    pf_module=_module(
        "mlx5_core", None, "kernel/drivers/net/ethernet/mellanox/mlx5/core/mlx5_core.ko.xz", True
    ),
    pf_driver="mlx5_core",
    vf_module=_module(
        "mlx5_vfio_pci", None, "kernel/drivers/vfio/pci/mlx5/mlx5-vfio-pci.ko.xz", True
    ),
    vf_driver="mlx5_vfio_pci",
    vf_count=1,
    total_vfs=8,
    firmware="28.39.1002",
    vfio_bound=True,
)
FUNCTIONS = {spec.key: spec for spec in (H100, L40S, XE, MLX5)}
# Group numbers of the fixture VFs: the lab has nodes /dev/vfio/0..63.
FIRST_GROUP = 40


@dataclass
class SriovHostBuilder(HostBuilder):
    """A :class:`HostBuilder` that also writes physical functions with virtual functions."""

    enabled: dict[str, int] = field(default_factory=dict)  # spec key -> VFs enabled
    profiles: dict[str, str] = field(default_factory=dict)  # VF address -> profile id set
    groups: dict[str, str] = field(default_factory=dict)  # VF address -> IOMMU group

    def _spec_of(self, address: str) -> FunctionSpec:
        for spec in FUNCTIONS.values():
            if any(spec.vf_address(i) == address for i in range(spec.total_vfs)):
                return spec
        raise KeyError(f"no fixture VF {address}")

    def _pci_device(self, devpath: str, address: str, vendor: int, device_id: int) -> Path:
        device = self.at(devpath)
        device.mkdir(parents=True, exist_ok=True)
        _write(device / "vendor", f"0x{vendor:04x}\n")
        _write(device / "device", f"0x{device_id:04x}\n")
        _write(device / "uevent", f"PCI_ID={vendor:04X}:{device_id:04X}\nPCI_SLOT_NAME={address}\n")
        _relative_link(device / "subsystem", self.sys / "bus" / "pci")
        _relative_link(self.sys / "bus" / "pci" / "devices" / address, device)
        return device

    def _bind(self, device: Path, driver: str, module: str) -> None:
        driver_dir = self._write_driver("pci", driver, module)
        _relative_link(device / "driver", driver_dir)
        _relative_link(driver_dir / device.name, device)
        _write(device / "uevent", (device / "uevent").read_text() + f"DRIVER={driver}\n")

    def build_sriov(self, key: str, vfs: int | None = None) -> None:
        """The physical function *key* (``h100``, ``xe``, ``mlx5``) bound to its driver, then
        *vfs* (default: the spec's count) virtual functions enabled."""
        spec = FUNCTIONS[key]
        for directory in ("bus/pci/devices", "class/mdev_bus", "module", "bus/mdev/devices"):
            (self.sys / directory).mkdir(parents=True, exist_ok=True)
        for module_spec in {m.module: m for m in (spec.pf_module, spec.vf_module)}.values():
            self._write_module(module_spec, module_spec.version)
        device = self._pci_device(spec.devpath, spec.address, *spec.pci_id)
        _write(device / "sriov_totalvfs", f"{spec.total_vfs}\n")
        _write(device / "sriov_numvfs", "0\n")
        if spec.firmware is not None:
            _write(device / "infiniband" / "mlx5_0" / "fw_ver", spec.firmware + "\n")
        self.uevent(spec.devpath, "add")
        self._bind(device, spec.pf_driver, spec.pf_module.module)
        self.uevent(spec.devpath, "bind")
        self.enable_vfs(key, spec.vf_count if vfs is None else vfs)

    def enable_vfs(self, key: str, count: int) -> list[str]:
        """``echo N > sriov_numvfs``: each VF ``add`` and ``bind``, then ``change`` on the PF."""
        spec = FUNCTIONS[key]
        pf = self.at(spec.devpath)
        addresses = []
        for index in range(count):
            address = spec.vf_address(index)
            devpath = f"/devices/pci0000:{spec.bus}/0000:{spec.bus}:01.0/{address}"
            device = self._pci_device(devpath, address, spec.pci_id[0], spec.vf_device)
            _relative_link(device / "physfn", pf)
            _relative_link(pf / f"virtfn{index}", device)
            group = self.groups.setdefault(address, str(FIRST_GROUP + len(self.groups)))
            group_dir = self.sys / "kernel" / "iommu_groups" / group
            _relative_link(group_dir / "devices" / address, device)
            _relative_link(device / "iommu_group", group_dir)
            if spec.profiles:
                _write(device / "nvidia" / "current_vgpu_type", "0\n")
                _write(device / "nvidia" / "creatable_vgpu_types", HEADING)
                _write(device / "nvidia" / "gpu_instance_id", "-1\n")
                _write(device / "nvidia" / "placement_id", "-1\n")
                _write(device / "nvidia" / "vgpu_params", "\n")
                _write(device / "nvidia" / "warm_update", "0\n")
            self.uevent(devpath, "add")
            self._bind(device, spec.vf_driver, spec.vf_module.module)
            if spec.vfio_bound:
                vfio_dev = device / "vfio-dev" / f"vfio{group}"
                vfio_dev.mkdir(parents=True, exist_ok=True)
                _write(vfio_dev / "uevent", f"DEVNAME=vfio/devices/vfio{group}\n")
            self.uevent(devpath, "bind")
            addresses.append(address)
        self.enabled[key] = count
        _write(pf / "sriov_numvfs", f"{count}\n")
        self._refresh_creatable(spec)
        self.uevent(spec.devpath, "change")
        return addresses

    def disable_vfs(self, key: str) -> None:
        """``echo 0 > sriov_numvfs``: each VF ``unbind`` and ``remove``, then ``change``."""
        spec = FUNCTIONS[key]
        pf = self.at(spec.devpath)
        for index in range(self.enabled.get(key, 0)):
            address = spec.vf_address(index)
            device = (self.sys / "bus" / "pci" / "devices" / address).resolve()
            devpath = "/" + str(device.relative_to(self.sys))
            self.uevent(devpath, "unbind")
            (device / "driver").unlink()
            self.uevent(devpath, "remove")
            (self.sys / "bus" / "pci" / "devices" / address).unlink()
            (pf / f"virtfn{index}").unlink()
            shutil.rmtree(self.sys / "kernel" / "iommu_groups" / self.groups[address])
            shutil.rmtree(device)
            self.profiles.pop(address, None)
        self.enabled[key] = 0
        _write(pf / "sriov_numvfs", "0\n")
        self.uevent(spec.devpath, "change")

    def rebind_vf(self, address: str, driver: str, module: str) -> None:
        """Re-bind a VF: its ``vfio-dev`` goes with a VFIO driver and comes with one."""
        device = self._vf_dir(address)
        shutil.rmtree(device / "vfio-dev", ignore_errors=True)
        if driver.replace("_", "-").endswith("vfio-pci"):
            group = self.groups[address]
            _write(
                device / "vfio-dev" / f"vfio{group}" / "uevent",
                f"DEVNAME=vfio/devices/vfio{group}\n",
            )
        self.rebind_pci(address, driver, module)

    # ---- profiles -----------------------------------------------------------------------------

    def _vf_dir(self, address: str) -> Path:
        return (self.sys / "bus" / "pci" / "devices" / address).resolve()

    def _refresh_creatable(self, spec: FunctionSpec) -> None:
        """What each VF of *spec* lists now, the way the vGPU manager narrows it."""
        if not spec.profiles:
            return
        vfs = [spec.vf_address(i) for i in range(self.enabled.get(spec.key, 0))]
        in_use = [self.profiles[a] for a in vfs if a in self.profiles]
        for address in vfs:
            lines = [HEADING]
            if address not in self.profiles:
                for profile in spec.profiles:
                    fits = all(p == profile.number for p in in_use)
                    room = in_use.count(profile.number) < profile.per_gpu
                    if fits and room:
                        lines.append(_profile_line(profile.number, profile.name))
            _write(self._vf_dir(address) / "nvidia" / "creatable_vgpu_types", "".join(lines))

    def _apply_profile(self, address: str, number: str) -> None:
        spec = self._spec_of(address)
        creatable = (self._vf_dir(address) / "nvidia" / "creatable_vgpu_types").read_text()
        listed = {line.split(":")[0].strip() for line in creatable.splitlines()[1:]}
        if number != "0" and number not in listed:
            raise ValueError(f"profile {number} is not creatable on {address}")
        if number == "0":
            self.profiles.pop(address, None)
        else:
            self.profiles[address] = number
        _write(self._vf_dir(address) / "nvidia" / "current_vgpu_type", f"{number}\n")
        self._refresh_creatable(spec)

    def set_profile(self, address: str, number: str) -> None:
        """An administrator (or vgpu-device-manager, or KubeVirt tooling) writes *number*
        (``0``: clear) to the VF's ``current_vgpu_type``; no uevent, as with the real driver."""
        self._apply_profile(address, number)

    def current_profile(self, address: str) -> str:
        return (self._vf_dir(address) / "nvidia" / "current_vgpu_type").read_text().strip()

    def answer_writes(self) -> int:
        """Also act on ids written to ``current_vgpu_type`` (no uevent, see the docstring)."""
        answered = super().answer_writes()
        for key, count in self.enabled.items():
            spec = FUNCTIONS[key]
            if not spec.profiles:
                continue
            for index in range(count):
                address = spec.vf_address(index)
                try:
                    written = self.current_profile(address)
                except OSError:
                    continue
                if not written:
                    continue  # caught between the writer's truncation and its write
                if written != self.profiles.get(address, "0"):
                    attribute = self._vf_dir(address) / "nvidia" / "current_vgpu_type"
                    times = attribute.stat()
                    try:
                        self._apply_profile(address, written)
                        # A driver answers within the write: the attribute keeps its time.
                        os.utime(attribute, ns=(times.st_atime_ns, times.st_mtime_ns))
                    except ValueError as err:
                        sys.stderr.write(f"umockdev host: {err}; refused\n")
                        _write(
                            self._vf_dir(address) / "nvidia" / "current_vgpu_type",
                            self.profiles.get(address, "0") + "\n",
                        )
                    answered += 1
        return answered


def recorded_uevents(builder: HostBuilder, start: int = 0) -> list[Any]:
    """The uevents a :class:`DirectoryTestbed` recorded from *start* on, as discovery's
    ``Uevent`` values (for in-process tests without umockdev)."""
    from vfiocaps.discovery.monitor import Uevent

    testbed = builder.testbed
    assert isinstance(testbed, DirectoryTestbed)
    return [
        Uevent(
            action=p["ACTION"],
            devpath=p["DEVPATH"],
            subsystem=p["SUBSYSTEM"],
            driver=p.get("DRIVER", ""),
            seqnum=int(p["SEQNUM"]),
        )
        for p in testbed.uevents[start:]
    ]


@dataclass
class SriovMockHost(MockHost):
    """A :class:`MockHost` whose wrapped process builds SR-IOV hosts too."""

    def command(self) -> list[str]:
        # This module imports its package relatively: run it as support.umockdev_sriov, with
        # the tests directory on the path, as pytest has it.
        tests = str(Path(__file__).resolve().parent.parent)
        run = (
            f"import runpy, sys; sys.path.insert(0, {tests!r}); "
            "runpy.run_module('support.umockdev_sriov', run_name='__main__', alter_sys=True)"
        )
        return [sys.executable, "-c", run]

    def build_sriov(self, key: str, vfs: int | None = None) -> None:
        self.call("build_sriov", key=key, vfs=vfs)

    def enable_vfs(self, key: str, count: int) -> list[str]:
        return list(self.call("enable_vfs", key=key, count=count))

    def disable_vfs(self, key: str) -> None:
        self.call("disable_vfs", key=key)

    def set_profile(self, address: str, number: str) -> None:
        self.call("set_profile", address=address, number=number)

    def current_profile(self, address: str) -> str:
        return str(self.call("current_profile", address=address))

    def rebind_vf(self, address: str, driver: str, module: str) -> None:
        self.call("rebind_vf", address=address, driver=driver, module=module)


if __name__ == "__main__":
    serve(iter(sys.stdin.readline, ""), sys.stdout, SriovHostBuilder)
