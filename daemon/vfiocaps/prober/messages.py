"""The one table of QEMU (and vendor driver) messages the prober understands, with their origin."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Meaning(enum.Enum):
    """What a known message tells the prober."""

    BENIGN = "benign"  # printed on successful starts; never a failure
    GL_REQUIRED = "gl-required"  # dma-buf display, and this QEMU has no OpenGL
    NO_DISPLAY = "no-display"  # display=on, but the device offers none
    MIGRATION_UNSUPPORTED = "migration-unsupported"
    DIRTY_TRACKING_UNSUPPORTED = "dirty-tracking-unsupported"  # neither device nor IOMMU
    DEVICE_DIRTY_TRACKING_FAILED = "device-dirty-tracking-failed"  # at migrate time
    BUSY = "busy"  # the group is open elsewhere (a VM)
    NO_SUCH_DEVICE = "no-such-device"
    ALREADY_ATTACHED = "already-attached"
    PERMISSION_DENIED = "permission-denied"
    KVM_REQUIRED = "kvm-required"  # the vendor driver insists on a KVM association
    VM_UUID_REQUIRED = "vm-uuid-required"  # the vendor manager reads -uuid
    KVM_UNAVAILABLE = "kvm-unavailable"  # accel=kvm could not be initialised
    PROPERTY_UNKNOWN = "property-unknown"  # this QEMU lacks a vfio-pci property we passed
    LOAD_FAILED = "load-failed"  # a destination could not load a saved migration stream
    GL_UNAVAILABLE = "gl-unavailable"  # egl-headless could not use the render node


@dataclass(frozen=True)
class KnownMessage:
    """A message text (as a regular expression), what it means, and which software prints it."""

    meaning: Meaning
    pattern: re.Pattern[str]
    origin: str  # the program that prints it
    versions: tuple[str, ...]  # the versions of that program it was taken from


def _m(meaning: Meaning, pattern: str, origin: str, *versions: str) -> KnownMessage:
    return KnownMessage(meaning, re.compile(pattern), origin, versions)


QEMU = "QEMU"

KNOWN_MESSAGES: tuple[KnownMessage, ...] = (
    # Warnings on successful starts.
    _m(Meaning.BENIGN, r"Failed to set up UNMASK eventfd signaling", QEMU, "10.0"),
    _m(Meaning.BENIGN, r"Could not enable error recovery for the device", QEMU, "10.0"),
    _m(Meaning.BENIGN, r"Cannot reset device \S+, no available reset mechanism", QEMU, "10.0"),
    _m(Meaning.BENIGN, r"warning: host doesn't support requested feature", QEMU, "7.2", "10.0"),
    # Realize failures of vfio-pci (stderr after ``-device ...:``, or a QMP GenericError).
    _m(Meaning.GL_REQUIRED, r"vfio-display-dmabuf: opengl not available", QEMU, "7.2", "10.0"),
    _m(
        Meaning.NO_DISPLAY,
        r"device doesn't support any \(known\) display method",
        QEMU,
        "7.2",
        "10.0",
    ),
    _m(Meaning.MIGRATION_UNSUPPORTED, r"VFIO migration is not supported in kernel", QEMU, "10.0"),
    _m(Meaning.MIGRATION_UNSUPPORTED, r"VFIO device doesn't support migration", QEMU, "7.2"),
    _m(
        Meaning.DIRTY_TRACKING_UNSUPPORTED,
        r"VFIO device doesn't support device and IOMMU dirty tracking",
        QEMU,
        "10.0",
    ),
    _m(Meaning.DEVICE_DIRTY_TRACKING_FAILED, r"Failed to get DMA logging report", QEMU, "10.0"),
    _m(Meaning.DEVICE_DIRTY_TRACKING_FAILED, r"Failed to start DMA logging", QEMU, "10.0"),
    _m(Meaning.BUSY, r"Could not open '[^']*': Device or resource busy", QEMU, "10.0"),
    _m(Meaning.BUSY, r"failed to open /dev/vfio/\d+: Device or resource busy", QEMU, "7.2"),
    _m(Meaning.NO_SUCH_DEVICE, r"no such host device", QEMU, "7.2", "10.0"),
    _m(Meaning.ALREADY_ATTACHED, r"device is already attached", QEMU, "10.0"),
    _m(Meaning.PERMISSION_DENIED, r"Could not open '[^']*': Permission denied", QEMU, "10.0"),
    _m(Meaning.PERMISSION_DENIED, r"failed to open /dev/vfio/\S+: Permission denied", QEMU, "7.2"),
    _m(Meaning.KVM_UNAVAILABLE, r"Could not access KVM kernel module", QEMU, "7.2", "10.0"),
    _m(Meaning.KVM_UNAVAILABLE, r"failed to initialize kvm", QEMU, "7.2", "10.0"),
    _m(Meaning.PROPERTY_UNKNOWN, r"Property '[^']*' not found", QEMU, "7.2", "10.0"),
    # A destination's load failure (migration/migration.c, migration/savevm.c).
    _m(Meaning.LOAD_FAILED, r"load of migration failed", QEMU, "7.2", "10.0"),
    _m(Meaning.LOAD_FAILED, r"error while loading state", QEMU, "7.2", "10.0"),
    # ``-display egl-headless`` without a usable render node (ui/egl-helpers.c).
    _m(Meaning.GL_UNAVAILABLE, r"egl: no drm render node available", QEMU, "7.2", "10.0"),
    _m(Meaning.GL_UNAVAILABLE, r"egl: gbm_create_device failed", QEMU, "7.2"),
    _m(Meaning.GL_UNAVAILABLE, r"egl: render node init failed", QEMU, "7.2"),
    # Vendor drivers, relayed by QEMU when the device open fails.
    _m(Meaning.KVM_REQUIRED, r"KVM is required to use Intel vGPU", "Intel GVT-g (i915)", "6.x"),
    _m(
        Meaning.VM_UUID_REQUIRED,
        r"Failed to get VM UUID from QEMU command-line",
        "NVIDIA vGPU manager",
        "all",
    ),
    # The Xe PF driver turns VF migration off with a notice naming the missing prerequisite
    # ("requires GuC version >= 70.54.0", "requires memory-based IRQ support";
    # drivers/gpu/drm/xe/xe_sriov_pf_migration.c, xe_gt_sriov_pf_migration.c); xe-vfio-pci
    # then offers no migration and QEMU reports it as not supported in kernel.
    _m(
        Meaning.MIGRATION_UNSUPPORTED,
        r"migration disabled: requires \S",
        "Intel Xe PF driver (xe)",
        "6.19",
    ),
)

FAILURE_PRIORITY = (Meaning.BUSY, Meaning.KVM_REQUIRED, Meaning.VM_UUID_REQUIRED)


@dataclass(frozen=True)
class Finding:
    """One line of output recognised as a known message."""

    message: KnownMessage
    line: str

    @property
    def meaning(self) -> Meaning:
        """The recognised message's meaning."""
        return self.message.meaning


def recognise(line: str) -> KnownMessage | None:
    """The known message *line* contains, or ``None``. Raises nothing."""
    for message in KNOWN_MESSAGES:
        if message.pattern.search(line):
            return message
    return None


def findings(text: str) -> tuple[Finding, ...]:
    """Every known message in *text* (stderr or a QMP error description), in order."""
    found = []
    for line in text.splitlines():
        message = recognise(line)
        if message is not None:
            found.append(Finding(message, line.strip()))
    return tuple(found)


def first_failure(text: str) -> Finding | None:
    """The known message that explains a failure in *text*, or ``None`` when none does.

    Benign warnings never count. A busy device or a vendor refusal wins over the generic
    lines QEMU prints around it.
    """
    failures = [found for found in findings(text) if found.meaning is not Meaning.BENIGN]
    for meaning in FAILURE_PRIORITY:
        for found in failures:
            if found.meaning is meaning:
                return found
    return failures[0] if failures else None


def unexplained_lines(text: str) -> tuple[str, ...]:
    """The non-empty lines of *text* that are not benign warnings (for excerpts and logs)."""
    kept = []
    for line in text.splitlines():
        if not line.strip():
            continue
        message = recognise(line)
        if message is not None and message.meaning is Meaning.BENIGN:
            continue
        kept.append(line.rstrip())
    return tuple(kept)


def excerpt(text: str, limit: int = 2000) -> str:
    """The tail of *text*'s meaningful lines, at most *limit* characters."""
    joined = "\n".join(unexplained_lines(text))
    return joined if len(joined) <= limit else "..." + joined[-limit:]
