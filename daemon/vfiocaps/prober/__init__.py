"""Probe one VFIO device with a minimal sandboxed QEMU over QMP: display, GL need, migration."""

from __future__ import annotations

from .grantjournal import GrantError
from .identity import QemuMissingError, QemuUnusableError
from .launch import LaunchEvent, LaunchObserver, LaunchStage
from .plan import (
    Accel,
    DeviceSettings,
    OnOffAuto,
    ProbePlan,
    UnsupportedArchitectureError,
    build_qemu_argv,
)
from .prober import Prober, launch_identity
from .sandbox import ProbeSandboxError
from .target import ProbeTarget

__all__ = [
    "Accel",
    "DeviceSettings",
    "GrantError",
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
    "UnsupportedArchitectureError",
    "build_qemu_argv",
    "launch_identity",
]
