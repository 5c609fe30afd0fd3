"""The capability cache on disk: one SQLite file, versioned schema, recovery from corruption."""

from .records import CapabilityKey, CapabilityRecord, KnownDevice, ProbeHistoryEntry
from .sqlite import CapabilityStore, StoreCorruptError, StoreUnavailableError

__all__ = [
    "CapabilityKey",
    "CapabilityRecord",
    "CapabilityStore",
    "KnownDevice",
    "ProbeHistoryEntry",
    "StoreCorruptError",
    "StoreUnavailableError",
]
