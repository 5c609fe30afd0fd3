"""Probe one VFIO device with a minimal sandboxed QEMU over QMP: display, GL need, migration."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .grantjournal import GrantError
from .identity import QemuMissingError, QemuUnusableError
from .prober import Prober, launch_identity
from .sandbox import ProbeSandboxError

if TYPE_CHECKING:
    from .events import LaunchEvent, LaunchObserver, LaunchStage
    from .plan import (
        Accel,
        DeviceSettings,
        OnOffAuto,
        ProbePlan,
        UnsupportedArchitectureError,
        build_qemu_argv,
        machine_for_architecture,
    )
    from .single import (
        LaunchAnswer,
        RoundTrip,
        ask_each,
        launch_credentials,
        probe_accel,
        round_trip,
    )
    from .target import ProbeTarget

# The daemon's start needs the prober and its errors only: the rest of the public API is
# imported when first used (the launch plan and the single-question helpers are for probes,
# vfiocapsctl and the benchmarks).
_LATER = {
    "LaunchEvent": ".events",
    "LaunchObserver": ".events",
    "LaunchStage": ".events",
    "Accel": ".plan",
    "DeviceSettings": ".plan",
    "OnOffAuto": ".plan",
    "ProbePlan": ".plan",
    "UnsupportedArchitectureError": ".plan",
    "build_qemu_argv": ".plan",
    "machine_for_architecture": ".plan",
    "LaunchAnswer": ".single",
    "RoundTrip": ".single",
    "ask_each": ".single",
    "launch_credentials": ".single",
    "probe_accel": ".single",
    "round_trip": ".single",
    "ProbeTarget": ".target",
}


def __getattr__(name: str) -> object:
    """A public name not imported at start, imported now. Raises :class:`AttributeError` for
    any other name."""
    module = _LATER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Accel",
    "DeviceSettings",
    "GrantError",
    "LaunchAnswer",
    "LaunchEvent",
    "LaunchObserver",
    "LaunchStage",
    "OnOffAuto",
    "ProbePlan",
    "ProbeSandboxError",
    "ProbeTarget",
    "Prober",
    "QemuMissingError",
    "QemuUnusableError",
    "RoundTrip",
    "UnsupportedArchitectureError",
    "ask_each",
    "build_qemu_argv",
    "launch_credentials",
    "launch_identity",
    "machine_for_architecture",
    "probe_accel",
    "round_trip",
]
