"""What a probe learns about a device: display mechanism, GL need, migration, and the outcome."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Display(enum.Enum):
    """How a device offers a display to QEMU."""

    UNKNOWN = "unknown"
    NONE = "none"
    REGION = "region"  # vfio region display: no OpenGL needed
    DMABUF = "dmabuf"  # vfio dma-buf display: needs OpenGL (egl-headless, spice gl, ...)


class Migration(enum.Enum):
    """Whether QEMU can live-migrate a VM with this device."""

    UNKNOWN = "unknown"
    UNSUPPORTED = "unsupported"
    SUPPORTED = "supported"


class ProbeOutcome(enum.Enum):
    """How a probe ended. Only ``OK`` carries capabilities."""

    OK = "ok"
    BUSY = "busy"  # the device is open elsewhere (a VM): never disturbed
    NO_KVM = "no-kvm"  # the driver requires a KVM association and /dev/kvm is unusable
    QEMU_MISSING = "qemu-missing"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The truth about one device type, as one QEMU version saw it.

    ``migration`` describes the device as consumers start it, with QEMU's defaults (libvirt,
    KubeVirt and Nova add no device options). When the device migrates only with extra ``-device``
    properties, ``migration_options`` names them (property, value) and ``migration_with_options``
    is the verdict with them set.
    """

    display: Display
    gl_required: bool
    migration: Migration
    migration_blockers: tuple[str, ...] = ()
    migration_notes: tuple[str, ...] = ()
    qemu_version: str = ""
    migration_options: tuple[tuple[str, str], ...] = ()
    migration_with_options: Migration = Migration.UNKNOWN


@dataclass(frozen=True, slots=True)
class LaunchRecord:
    """One QEMU launch made by a probe, for the probe history and benchmarks."""

    purpose: str
    argv: tuple[str, ...]
    duration: float
    exit_status: int | None


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """The result of probing one device: outcome, capabilities when OK, and the evidence."""

    outcome: ProbeOutcome
    capabilities: Capabilities | None
    error: str = ""
    stderr_excerpt: str = ""
    launches: tuple[LaunchRecord, ...] = ()
    notes: tuple[str, ...] = ()  # how the probe ran: sandbox user, accelerator, fallbacks

    @property
    def duration(self) -> float:
        """Total wall time of the probe's QEMU launches."""
        return sum(launch.duration for launch in self.launches)
