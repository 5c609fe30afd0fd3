"""The moments of a probe launch an observer is told about (without the launch code: the daemon
imports these at start, the launch code when it first probes)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class LaunchStage(enum.Enum):
    """Moments of a launch an observer is told about."""

    STARTED = "started"  # the QEMU process exists
    QMP_READY = "qmp-ready"  # the QMP session is established
    ENDED = "ended"  # the process has been reaped


@dataclass(frozen=True)
class LaunchEvent:
    """A moment of a launch, for observers (logging, tests, history)."""

    stage: LaunchStage
    purpose: str
    pid: int


LaunchObserver = Callable[[LaunchEvent], None]
