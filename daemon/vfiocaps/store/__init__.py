"""The capability cache on disk: one SQLite file, versioned schema, recovery from corruption."""

from .dbfile import StoreCorruptError, StoreUnavailableError
from .records import CapabilityKey, CapabilityRecord, KnownDevice, ProbeHistoryEntry
from .sqlite import CapabilityStore

__all__ = [
    "CapabilityKey",
    "CapabilityRecord",
    "CapabilityStore",
    "KnownDevice",
    "ProbeHistoryEntry",
    "StoreCorruptError",
    "StoreUnavailableError",
]
