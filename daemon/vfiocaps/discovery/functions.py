"""SR-IOV virtual functions read from sysfs: the vGPU profiles each can take or carries
(NVIDIA vGPU 17 and later, no mdev), and the physical function's firmware where shown."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..ids import is_pci_address, is_sysfs_name
from ..model import NEEDS_GPU_INSTANCE, MdevType, TypeKind
from .sysfs import SysfsTree

log = logging.getLogger("vfiocaps.discovery")

# NVIDIA's SR-IOV vGPU attributes of a virtual function (vGPU 17 and later on Ada, Hopper).
PROFILE_DIR = "nvidia"
CREATABLE_PROFILES = "creatable_vgpu_types"
CURRENT_PROFILE = "current_vgpu_type"
NO_PROFILE = "0"
# MIG-backed profiles are named <model>-<slices>-<memory><series> (NVIDIA H100-1-10C,
# H100-3-40C, A100-2-10C); time-sliced ones <model>-<memory><series> (NVIDIA H100-20C).
_MIG_PROFILE = re.compile(r"-[0-9]+-[0-9]+[A-Z]+$")
# A physical function lists its virtual functions as links virtfn0, virtfn1, ...
VIRTFN_PREFIX = "virtfn"
# The firmware version of a physical function, where its RDMA side shows it (mlx5).
FIRMWARE_ATTRIBUTE = "fw_ver"


def parse_profiles(text: str) -> tuple[tuple[str, str], ...]:
    """``(id, name)`` of every line ``<id> : <name>`` of ``creatable_vgpu_types``, in order.

    The heading line (``ID    : vGPU Name``) and anything that is not a decimal id with a
    printable name are skipped.
    """
    profiles = []
    for line in text.splitlines():
        number, sep, name = line.partition(":")
        number, name = number.strip(), name.strip()
        if not sep or not number.isascii() or not number.isdigit() or len(number) > 9:
            continue
        if number == NO_PROFILE or not is_sysfs_name(name):
            continue
        profiles.append((str(int(number)), name))
    return tuple(profiles)


def mig_backed(name: str) -> bool:
    """Whether the profile named *name* runs in a MIG GPU instance (``NVIDIA H100-1-10C``)."""
    return _MIG_PROFILE.search(name) is not None


@dataclass(frozen=True)
class VirtualFunction:
    """One SR-IOV virtual function of a physical function that offers vGPU profiles."""

    address: str
    sysfs_path: str  # resolved
    profile: str  # the profile set now (current_vgpu_type); "" when none
    creatable: tuple[tuple[str, str], ...]  # (id, name) it could take now


def profile_types(parent: str, functions: list[VirtualFunction]) -> tuple[MdevType, ...]:
    """The profiles of a physical function: those its VFs can take now, each with the number
    of free VFs that can take it, plus those set on a VF (a VF with a profile lists none, and
    its siblings list only what still fits: such a profile may be listed by no VF)."""
    names: dict[str, str] = {}
    free: dict[str, int] = {}
    for function in functions:
        for number, label in function.creatable:
            names.setdefault(number, label)
            if not function.profile:
                free[number] = free.get(number, 0) + 1
    for function in functions:
        if function.profile:
            names.setdefault(function.profile, "")
    return tuple(
        MdevType(
            parent=parent,
            type_id=number,
            name=names[number],
            description="",
            device_api="vfio-pci",
            available_instances=free.get(number, 0),
            kind=TypeKind.VF_PROFILE,
            requires=NEEDS_GPU_INSTANCE if mig_backed(names[number]) else "",
        )
        for number in sorted(names, key=int)
    )


class FunctionReader:
    """Reads virtual functions and firmware versions from a :class:`SysfsTree`; returns
    nothing rather than raising for what is absent, vanishing or malformed."""

    def __init__(self, sysfs: SysfsTree) -> None:
        self.sysfs = sysfs

    def virtual_functions(self, pf_dir: Path) -> list[VirtualFunction]:
        """The virtual functions of the physical function at *pf_dir* that carry vGPU
        profile attributes, in VF number order."""
        numbered = []
        for entry in self.sysfs.list_dir(pf_dir):
            number = entry.removeprefix(VIRTFN_PREFIX)
            if entry.startswith(VIRTFN_PREFIX) and number.isascii() and number.isdigit():
                numbered.append((int(number), entry))
        functions = []
        for _, entry in sorted(numbered):
            real = self.sysfs.resolve(pf_dir / entry)
            if real is None or not is_pci_address(real.name):
                continue
            profile_dir = self.sysfs.resolve(real / PROFILE_DIR)
            if profile_dir is None:
                continue
            creatable = self.sysfs.read_attribute(profile_dir, CREATABLE_PROFILES)
            current = self.sysfs.read_attribute(profile_dir, CURRENT_PROFILE)
            if creatable is None or current is None:
                continue
            if current != NO_PROFILE and not (current.isascii() and current.isdigit()):
                log.warning("sysfs: %s/%s holds %r; VF skipped", real, CURRENT_PROFILE, current)
                continue
            profile = "" if current == NO_PROFILE else str(int(current))
            functions.append(
                VirtualFunction(real.name, str(real), profile, parse_profiles(creatable))
            )
        return functions

    def firmware(self, pf_dir: Path) -> str | None:
        """The firmware version of a physical function, where its RDMA device shows it
        (``infiniband/<device>/fw_ver``: mlx5)."""
        for ib_device in self.sysfs.list_dir(pf_dir / "infiniband")[:1]:
            value = self.sysfs.read_text(pf_dir / "infiniband" / ib_device / FIRMWARE_ATTRIBUTE)
            if value and is_sysfs_name(value):
                return value
        return None
