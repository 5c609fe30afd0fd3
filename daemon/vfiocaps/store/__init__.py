"""The capability cache on disk: one SQLite file, versioned schema, recovery from corruption."""

from .records import CapabilityKey, CapabilityRecord, KnownDevice, ProbeHistoryEntry, QemuIdentity
from .sqlite import CapabilityStore

__all__ = [
    "CapabilityKey",
    "CapabilityRecord",
    "CapabilityStore",
    "KnownDevice",
    "ProbeHistoryEntry",
    "QemuIdentity",
]
