"""Migration verdicts per configuration (QEMU's defaults, the device's options) from round trips."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..capabilities import Decider, Migration, MigrationCondition
from .messages import Meaning, findings, first_failure, unexplained_lines

ENABLE_MIGRATION = "enable-migration"
DEVICE_DIRTY_TRACKING = "x-device-dirty-page-tracking"
TRACKING_OFF_OPTIONS: tuple[tuple[str, str], ...] = (
    (DEVICE_DIRTY_TRACKING, "off"),
    (ENABLE_MIGRATION, "on"),
)
TRACKING_OFF_NOTE = (
    "migrates only with x-device-dirty-page-tracking=off and enable-migration=on: QEMU then "
    "takes dirty pages from the IOMMU container instead of the device (the type1 container "
    "reports the pages a mediated device's driver keeps pinned, and every mapped page of a "
    "device behind a hardware IOMMU), which can lengthen the final copy and the downtime"
)
# QEMU 8.1 to 10.0 add this blocker for every migratable VFIO device behind a virtual IOMMU
# (hw/vfio/migration.c, vfio_migration_realize); later versions lift it in some cases (device
# dirty tracking off), so for them the rule is not assumed.
VIOMMU_BLOCKER = "Migration is currently not supported with vIOMMU enabled"
VIOMMU_RULE_VERSIONS = ((8, 1), (10, 0))
P2P_RULE = (
    "QEMU migrates several VFIO devices of one VM only when all of them report P2P "
    "(Multiple VFIO devices migration is supported only if all of them support P2P migration)"
)


# A destination started with -S that loaded the state stays stopped: "paused", or the source's
# own state when the source never ran ("prelaunch": QEMU restores the runstate the stream
# carries; observed with QEMU 7.2).
LOADED_RUNSTATES = frozenset({"paused", "prelaunch"})


class Configuration(enum.Enum):
    """The VM configuration a migration verdict is about."""

    DEFAULTS = "defaults"  # QEMU's defaults: what libvirt, KubeVirt and Nova start
    OPTIONS = "options"  # with the device options that make it migrate


@dataclass(frozen=True)
class MigrationResult:
    """The outcome of saving the paused VM into the probe's bounded stream file."""

    status: str  # QEMU's final status: completed, failed, cancelled
    error: str = ""
    device_bytes: int | None = None  # query-migrate "vfio" "transferred"
    duration: float = 0.0
    stream_bytes: int | None = None  # the size of the whole migration stream received
    stream_kept: bool = False  # the whole stream is in the probe's directory for the load
    limit: int = 0  # the stream size limit in force
    limit_exceeded: bool = False  # the stream grew past the limit and the save was cancelled


@dataclass(frozen=True)
class IncomingResult:
    """The outcome of loading a saved stream into a fresh QEMU started with ``-incoming defer``."""

    status: str  # the destination's final migration status ("completed", "failed", ...)
    error: str = ""
    runstate: str = ""  # query-status after the load (see LOADED_RUNSTATES)
    realized: bool | None = None  # the device's "realized" property after the load
    duration: float = 0.0


@dataclass
class ConfigurationVerdict:
    """What is known of one configuration (mutable while the probe runs)."""

    verdict: Migration = Migration.UNKNOWN
    blockers: list[str] = field(default_factory=list)
    state_bytes: int = 0
    save_seconds: float = 0.0
    load_seconds: float = 0.0


@dataclass(frozen=True)
class KernelMigrationFacts:
    """What the kernel's VFIO interface says of the device (read by the VFIO helper)."""

    observable: bool
    flags: tuple[str, ...] = ()  # "stop-copy", "p2p", "pre-copy"
    dirty_tracking: bool | None = None  # DMA logging accepted (VFIO_DEVICE_FEATURE PROBE)
    reason: str = ""  # why it is not observable


class MigrationLedger:
    """Per-configuration verdicts of one probe, and the conditions derived from them."""

    def __init__(self) -> None:
        self.configurations: dict[Configuration, ConfigurationVerdict] = {}
        self.notes: list[str] = []
        self.options: tuple[tuple[str, str], ...] = ()

    def entry(self, configuration: Configuration) -> ConfigurationVerdict:
        """The (possibly new) entry for *configuration*."""
        return self.configurations.setdefault(configuration, ConfigurationVerdict())

    def verdict(self, configuration: Configuration) -> Migration:
        """The verdict for *configuration* so far."""
        entry = self.configurations.get(configuration)
        return entry.verdict if entry is not None else Migration.UNKNOWN

    def refuse(self, configuration: Configuration, blocker: str) -> None:
        """QEMU refused to migrate in *configuration* (blocker, realize error, save failure)."""
        entry = self.entry(configuration)
        entry.verdict = Migration.UNSUPPORTED
        entry.blockers.append(blocker)

    def saved(self, configuration: Configuration, result: MigrationResult) -> bool:
        """Record a save that did not fail; True when the stream awaits its load."""
        entry = self.entry(configuration)
        entry.save_seconds = result.duration
        if result.device_bytes is not None:
            entry.state_bytes = result.device_bytes
        if result.limit_exceeded:
            entry.verdict = Migration.UNKNOWN
            self.notes.append(
                f"{_label(configuration)}: state larger than {result.limit} bytes: not proven "
                "(raise the migration stream limit to prove it)"
            )
            return False
        if not result.stream_kept:
            entry.verdict = Migration.UNKNOWN
            self.notes.append(
                f"{_label(configuration)}: the state was saved but could not be kept for "
                "the load: not proven"
            )
            return False
        return True

    def loaded(self, configuration: Configuration, incoming: IncomingResult) -> None:
        """Record a load that reached the paused state with the device realized."""
        entry = self.entry(configuration)
        entry.verdict = Migration.SUPPORTED
        entry.load_seconds = incoming.duration

    def load_failed(self, configuration: Configuration, error: str, seconds: float) -> None:
        """Record a saved state the destination could not load."""
        entry = self.entry(configuration)
        entry.verdict = Migration.UNSUPPORTED
        entry.load_seconds = seconds
        entry.blockers.append(f"the saved state does not load: {error}")

    # -- the published view -----------------------------------------------------------------

    def published(
        self,
    ) -> tuple[Migration, tuple[str, ...], Migration, tuple[tuple[str, str], ...]]:
        """(defaults verdict, its blockers, verdict with options, the options)."""
        defaults = self.entry(Configuration.DEFAULTS)
        options_entry = self.configurations.get(Configuration.OPTIONS)
        if options_entry is None:
            return defaults.verdict, tuple(defaults.blockers), defaults.verdict, ()
        options = self.options if options_entry.verdict is not Migration.UNSUPPORTED else ()
        return defaults.verdict, tuple(defaults.blockers), options_entry.verdict, options

    def proven(self) -> ConfigurationVerdict | None:
        """The configuration whose round trip gives the state size and times, if any."""
        for configuration in (Configuration.DEFAULTS, Configuration.OPTIONS):
            entry = self.configurations.get(configuration)
            if entry is not None and entry.save_seconds:
                return entry
        return None

    def option_notes(self) -> tuple[str, ...]:
        """Notes about the options configuration, for ``migration_notes``."""
        entry = self.configurations.get(Configuration.OPTIONS)
        if entry is None:
            return ()
        if entry.verdict is Migration.SUPPORTED:
            return (TRACKING_OFF_NOTE,)
        return tuple(f"{_label(Configuration.OPTIONS)}: {blocker}" for blocker in entry.blockers)


def _label(configuration: Configuration) -> str:
    if configuration is Configuration.DEFAULTS:
        return "with QEMU's defaults"
    return "with " + ",".join(f"{key}={value}" for key, value in TRACKING_OFF_OPTIONS)


def destination_error(stderr: str, qmp_error: str, incoming: IncomingResult | None) -> str:
    """The destination's own words for a failed load. Raises nothing."""
    if incoming is not None and incoming.error:
        return incoming.error
    load_failures = [
        found.line for found in findings(stderr) if found.meaning is Meaning.LOAD_FAILED
    ]
    if load_failures:
        return "; ".join(load_failures)
    failure = first_failure(stderr)
    if failure is not None:
        return failure.line
    lines = unexplained_lines(stderr)
    if lines:
        return lines[-1].strip()
    if qmp_error:
        return qmp_error
    if incoming is not None:
        if incoming.status != "completed":
            return f"the incoming migration ended {incoming.status or 'without a status'}"
        if incoming.runstate not in LOADED_RUNSTATES:
            return f"the destination is {incoming.runstate or 'in no state'}, not paused"
        if incoming.realized is not True:
            return "the device is not realized on the destination"
    return "the destination QEMU ended before the load completed"


def migration_conditions(
    best: Migration,
    options: tuple[tuple[str, str], ...],
    qemu_version: str,
    kernel: KernelMigrationFacts | None,
) -> tuple[MigrationCondition, ...]:
    """The VM configurations the device migrates in, each with the software that decided it.

    *best* is the verdict of the best configuration the probe proved (defaults, or the
    *options* when there are some).
    """
    if best is not Migration.SUPPORTED:
        reason = "the device does not migrate alone" if best is Migration.UNSUPPORTED else ""
        return (
            MigrationCondition("alone", best, Decider.QEMU, reason),
            MigrationCondition("beside other VFIO devices", best, Decider.QEMU, reason),
            MigrationCondition("with a virtual IOMMU", best, Decider.QEMU, reason),
        )
    how = (
        "with " + ",".join(f"{key}={value}" for key, value in options)
        if options
        else ("with QEMU's defaults")
    )
    conditions = [
        MigrationCondition(
            "alone", Migration.SUPPORTED, Decider.QEMU, f"saved and loaded again {how}"
        )
    ]
    if kernel is None or not kernel.observable:
        why = kernel.reason if kernel is not None and kernel.reason else "not read"
        conditions.append(
            MigrationCondition(
                "beside other VFIO devices",
                Migration.UNKNOWN,
                Decider.KERNEL,
                f"the kernel's migration flags are not observable ({why}); {P2P_RULE}",
            )
        )
    elif "p2p" in kernel.flags:
        conditions.append(
            MigrationCondition(
                "beside other VFIO devices",
                Migration.SUPPORTED,
                Decider.KERNEL,
                f"the kernel reports P2P for the device; {P2P_RULE}",
            )
        )
    else:
        conditions.append(
            MigrationCondition(
                "beside other VFIO devices",
                Migration.UNSUPPORTED,
                Decider.KERNEL,
                f"the kernel reports no P2P for the device; {P2P_RULE}",
            )
        )
    version = _major_minor(qemu_version)
    first, last = VIOMMU_RULE_VERSIONS
    if version is not None and first <= version <= last:
        conditions.append(
            MigrationCondition(
                "with a virtual IOMMU",
                Migration.UNSUPPORTED,
                Decider.QEMU,
                f"QEMU {qemu_version} blocks it: {VIOMMU_BLOCKER}",
            )
        )
    else:
        conditions.append(
            MigrationCondition(
                "with a virtual IOMMU",
                Migration.UNKNOWN,
                Decider.QEMU,
                f"QEMU {qemu_version or '(unknown version)'}'s rule for a virtual IOMMU is "
                "not known to vfiocaps",
            )
        )
    return tuple(conditions)


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])
