"""The engine: turns discovery events into cached capabilities with as few probes as truth allows.

Its parts know nothing of each other's owner: :mod:`.keys` (cache keys, stale records),
:mod:`.table` (live devices and their states), :mod:`.follow` (discovery's reports applied to
the table), :mod:`.cache` (records written behind),
:mod:`.qemu` (the QEMU binary), :mod:`.scheduler` (probe jobs), :mod:`.typeprobe` (temporary
instances), :mod:`.announcer` (listeners), :mod:`.domain` (answers for domains: fingerprints,
migration checks, domain XML); :mod:`.core` wires them into :class:`Engine`.
"""

from .core import Engine
from .views import (
    CacheState,
    DeviceSource,
    DeviceView,
    EngineListener,
    EngineStatus,
    ProbeRunner,
    ProbeState,
    Timings,
    TypeView,
)

__all__ = [
    "CacheState",
    "DeviceSource",
    "DeviceView",
    "Engine",
    "EngineListener",
    "EngineStatus",
    "ProbeRunner",
    "ProbeState",
    "Timings",
    "TypeView",
]
