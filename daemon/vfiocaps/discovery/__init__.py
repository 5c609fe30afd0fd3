"""Discovery: which parents, types (mdev types, VF profiles) and VFIO devices exist, and every
change to them."""

from __future__ import annotations

from .attributes import AttributeWriteError
from .errors import DiscoveryStateError, UdevUnavailableError
from .instances import InstanceError
from .profiles import ProfileError
from .service import Discovery, DiscoveryState, host_reader, read_device

__all__ = [
    "AttributeWriteError",
    "Discovery",
    "DiscoveryState",
    "DiscoveryStateError",
    "InstanceError",
    "ProfileError",
    "UdevUnavailableError",
    "host_reader",
    "read_device",
]
