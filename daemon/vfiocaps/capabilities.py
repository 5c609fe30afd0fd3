"""What a probe learns about a device: display mechanism, GL need, migration, and the outcome."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace


class Display(enum.Enum):
    """How a device offers a display to QEMU."""

    UNKNOWN = "unknown"
    NONE = "none"
    REGION = "region"  # vfio region display: no OpenGL needed
    DMABUF = "dmabuf"  # vfio dma-buf display: needs OpenGL (egl-headless, spice gl, ...)


class GlHost(enum.Enum):
    """Whether this host gave a dma-buf display the OpenGL it needs, and how far that was proven.

    ``set-up`` means QEMU realized the device with ``display=on`` under ``-display
    egl-headless`` on the render node, a console was linked to it and ``screendump`` answered:
    the display was set up. A guest's frames are not proven (with software rendering the first
    frame may still fail).
    """

    UNKNOWN = "unknown"  # not checked (an answer cached before the check existed)
    NOT_NEEDED = "not-needed"  # the display needs no OpenGL (or there is none)
    NO_RENDER_NODE = "no-render-node"  # no DRM render node on the host
    INACCESSIBLE = "inaccessible"  # a render node the probe user cannot open
    SET_UP = "set-up"  # the GL display was set up on the render node
    CRASHED = "crashed"  # QEMU crashed on the GL path
    FAILED = "failed"  # QEMU refused the GL display, or it did not answer as set up


class Migration(enum.Enum):
    """Whether QEMU can live-migrate a VM with this device."""

    UNKNOWN = "unknown"
    UNSUPPORTED = "unsupported"
    SUPPORTED = "supported"


class Decider(enum.Enum):
    """Which software decided a migration condition."""

    QEMU = "qemu"  # QEMU's own rules (blockers, realize checks) or a QEMU round trip
    KERNEL = "kernel"  # the kernel's VFIO answer for the device (migration flags, DMA logging)


@dataclass(frozen=True, slots=True)
class MigrationCondition:
    """One VM configuration and whether the device migrates in it, with who decided."""

    condition: str  # e.g. "alone", "beside other VFIO devices", "with a virtual IOMMU"
    verdict: Migration
    decided_by: Decider
    reason: str = ""


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
    is the verdict with them set (equal to ``migration`` when no options are needed).

    A ``supported`` verdict means the paused VM's device state was saved and loaded into a fresh
    QEMU on the same device. ``migration_state_bytes`` (the device's share of the stream, 0 when
    QEMU did not count it) and the save and load seconds (0.0 when not measured) come from that
    round trip. ``migration_flags`` are the kernel's VFIO migration flags for the device
    (``stop-copy``, ``p2p``, ``pre-copy``) and ``device_dirty_tracking`` whether the kernel
    accepts DMA logging for it; both are empty/``None`` when the kernel could not be asked
    ("not observable", see ``migration_conditions``).

    ``gl_required`` says QEMU refused the dma-buf display without OpenGL; ``gl_host`` says
    whether this host satisfied it (on ``gl_render_node``, the render node tried) and
    ``gl_detail`` the evidence or the reason, in words.
    """

    display: Display
    gl_required: bool
    migration: Migration
    migration_blockers: tuple[str, ...] = ()
    migration_notes: tuple[str, ...] = ()
    qemu_version: str = ""
    migration_options: tuple[tuple[str, str], ...] = ()
    migration_with_options: Migration = Migration.UNKNOWN
    migration_state_bytes: int = 0
    migration_save_seconds: float = 0.0
    migration_load_seconds: float = 0.0
    migration_flags: tuple[str, ...] = ()
    device_dirty_tracking: bool | None = None
    migration_conditions: tuple[MigrationCondition, ...] = ()
    gl_host: GlHost = GlHost.UNKNOWN
    gl_render_node: str = ""
    gl_detail: str = ""


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


# ---- evidence as stored: text QEMU, drivers and vendors wrote, made safe to show ----------

# C0 controls but tab and newline, DEL, and the C1 controls (a lone 0x9b starts a CSI sequence
# on many terminals). Tabs and newlines lay out multi-line stderr and move no cursor back.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """*text* without C0/C1 control characters (an escape sequence loses its ESC and so
    prints as plain characters). Raises nothing."""
    return _CONTROL.sub("", text)


def _texts(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(printable(value) for value in values)


def clean_capabilities(capabilities: Capabilities) -> Capabilities:
    """*capabilities* with every text field passed through :func:`printable`."""
    return replace(
        capabilities,
        migration_blockers=_texts(capabilities.migration_blockers),
        migration_notes=_texts(capabilities.migration_notes),
        qemu_version=printable(capabilities.qemu_version),
        migration_options=tuple(
            (printable(name), printable(value)) for name, value in capabilities.migration_options
        ),
        migration_flags=_texts(capabilities.migration_flags),
        migration_conditions=tuple(
            MigrationCondition(
                printable(condition.condition),
                condition.verdict,
                condition.decided_by,
                printable(condition.reason),
            )
            for condition in capabilities.migration_conditions
        ),
        gl_render_node=printable(capabilities.gl_render_node),
        gl_detail=printable(capabilities.gl_detail),
    )


def clean_report(report: ProbeReport) -> ProbeReport:
    """*report* with its error, stderr excerpt, notes and capabilities made printable (the
    launches' argv is the daemon's own)."""
    return replace(
        report,
        capabilities=None
        if report.capabilities is None
        else clean_capabilities(report.capabilities),
        error=printable(report.error),
        stderr_excerpt=printable(report.stderr_excerpt),
        notes=_texts(report.notes),
    )
