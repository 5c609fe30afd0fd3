"""Probe one VFIO device with a minimal sandboxed QEMU over QMP: display, GL need, migration."""

from __future__ import annotations

from .events import LaunchEvent, LaunchObserver, LaunchStage
from .grantjournal import GrantError
from .identity import QemuBinary, QemuMissingError, QemuUnusableError
from .plan import (
    Accel,
    DeviceSettings,
    OnOffAuto,
    ProbePlan,
    UnsupportedArchitectureError,
    build_qemu_argv,
    machine_for_architecture,
)
from .prober import Prober, launch_identity
from .sandbox import ProbeSandboxError
from .single import (
    LaunchAnswer,
    RoundTrip,
    ask_each,
    launch_credentials,
    probe_accel,
    round_trip,
)
from .target import ProbeTarget

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
    "QemuBinary",
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
