"""Rows of the capability cache as typed values: keys, records, history, known devices."""

from __future__ import annotations

from dataclasses import dataclass

from ..capabilities import Capabilities, ProbeOutcome


@dataclass(frozen=True, slots=True)
class CapabilityKey:
    """Everything that can change a probe's answer. Two devices with equal keys share one probe."""

    driver: str
    driver_version: str
    kernel_release: str
    parent_pci_id: str
    type_id: str
    qemu_path: str
    qemu_version: str
    qemu_ctime_ns: int

    def describe(self) -> str:
        """A short human form for logs: ``mtty 0.1 / mtty-1 (qemu 10.0.3)``."""
        pci = f" [{self.parent_pci_id}]" if self.parent_pci_id else ""
        return (
            f"{self.driver} {self.driver_version}{pci} / {self.type_id} (qemu {self.qemu_version})"
        )


@dataclass(frozen=True, slots=True)
class CapabilityRecord:
    """A cached answer for one key: capabilities when the probe succeeded, else the failure.

    A failure is cached with ``retry_at_us`` (unix microseconds) after which it may be probed
    again; ``failures`` counts consecutive failures for back-off.
    """

    key: CapabilityKey
    outcome: ProbeOutcome
    capabilities: Capabilities | None
    error: str
    probed_at_us: int
    retry_at_us: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class ProbeHistoryEntry:
    """One probe as it happened: when, for which key, how it ended and how long it took."""

    at_us: int
    key: CapabilityKey
    outcome: ProbeOutcome
    duration: float
    launches: int
    error: str


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """A device seen on the host, remembered across restarts."""

    device_id: str
    kind: str
    sysfs_path: str
    parent: str
    type_id: str
    driver: str
    driver_version: str
    last_seen_us: int
