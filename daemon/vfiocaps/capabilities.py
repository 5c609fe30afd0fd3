"""What a probe learns about a device: display mechanism, GL need, migration, and the outcome."""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, replace
from typing import Any

from .fieldspec import Place, schema_record, spec


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


_SUMMARY = Place.TYPE_SUMMARY
_TRACKING = {True: Migration.SUPPORTED, False: Migration.UNSUPPORTED, None: Migration.UNKNOWN}


@schema_record
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

    This class is the capability schema: each field declares its D-Bus (and JSON) name and
    signature, its ``show`` label and where else it appears (:mod:`vfiocaps.fieldspec`); every
    output and the cache derive from it (:mod:`vfiocaps.capschema`). A new field needs a
    default, so that answers cached before it existed still load.
    """

    display: Display = spec(
        "Display", "s", "display", "how the device offers a display", _SUMMARY | Place.LABELS
    )
    gl_required: bool = spec(
        "GlRequired", "b", "OpenGL", "the display needs OpenGL", _SUMMARY | Place.LABELS
    )
    migration: Migration = spec(
        "Migration",
        "s",
        "migration",
        "live migration with QEMU's defaults",
        _SUMMARY | Place.LABELS | Place.FINGERPRINT,
    )
    migration_blockers: tuple[str, ...] = spec(
        "MigrationBlockers", "as", "blocker", "why QEMU refuses to migrate", default=()
    )
    migration_notes: tuple[str, ...] = spec(
        "MigrationNotes", "as", "note", "how the migration answer was found", default=()
    )
    qemu_version: str = spec(
        "QemuVersion", "s", "QEMU", "the QEMU that answered", Place.FINGERPRINT, default=""
    )
    migration_options: tuple[tuple[str, str], ...] = spec(
        "MigrationOptions", "a(ss)", "options", "device options migration needs", default=()
    )
    migration_with_options: Migration = spec(
        "MigrationWithOptions",
        "s",
        "with options",
        "live migration with those options",
        _SUMMARY | Place.LABELS | Place.FINGERPRINT,
        default=Migration.UNKNOWN,
    )
    migration_state_bytes: int = spec(
        "MigrationStateBytes",
        "t",
        "state size",
        "the device's share of the migration stream",
        default=0,
        to_dbus=lambda value: max(0, value),
    )
    migration_save_seconds: float = spec(
        "MigrationSaveSeconds", "d", "save", "seconds the state took to save", default=0.0
    )
    migration_load_seconds: float = spec(
        "MigrationLoadSeconds", "d", "load", "seconds the state took to load", default=0.0
    )
    migration_flags: tuple[str, ...] = spec(
        "MigrationFlags",
        "as",
        "kernel flags",
        "the kernel's VFIO migration flags",
        Place.FINGERPRINT,
        default=(),
    )
    device_dirty_tracking: bool | None = spec(
        "DeviceDirtyTracking",
        "s",
        "dirty tracking",
        "whether the kernel accepts DMA logging for the device",
        default=None,
        to_dbus=lambda value: _TRACKING[value].value,
    )
    migration_conditions: tuple[MigrationCondition, ...] = spec(
        "MigrationConditions",
        "a(ssss)",
        "condition",
        "VM configurations and whether the device migrates in each",
        default=(),
    )
    gl_host: GlHost = spec(
        "GlHost",
        "s",
        "GL on host",
        "whether this host gives the display its OpenGL",
        _SUMMARY | Place.LABELS,
        default=GlHost.UNKNOWN,
    )
    gl_render_node: str = spec(
        "GlRenderNode", "s", "render node", "the render node the GL launch used", default=""
    )
    gl_detail: str = spec("GlDetail", "s", "gl", "the GL evidence, in words", default="")
    display_size: str = spec(
        "DisplaySize",
        "s",
        "display size",
        "WIDTHxHEIGHT of the display as the GL launch's screendump of its console showed it",
        Place.EVIDENCE,
        default="",
    )


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


def _clean(value: Any) -> Any:
    """*value* with every string in it, at any depth of tuples and records, made printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, tuple):
        return tuple(_clean(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return replace(
            value, **{f.name: _clean(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value


def clean_capabilities(capabilities: Capabilities) -> Capabilities:
    """*capabilities* with every text field (whatever fields the schema has) passed through
    :func:`printable`."""
    cleaned: Capabilities = _clean(capabilities)
    return cleaned


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
