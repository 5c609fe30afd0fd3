"""Discovery: which mdev parents, types and VFIO devices exist, and every change to them."""

from __future__ import annotations

from .errors import DiscoveryStateError, UdevUnavailableError
from .instances import InstanceError
from .service import Discovery, DiscoveryState, read_device

__all__ = [
    "Discovery",
    "DiscoveryState",
    "DiscoveryStateError",
    "InstanceError",
    "UdevUnavailableError",
    "read_device",
]
