"""The probe's vocabulary: a launch to make, what it showed, and the verdict a probe ends with."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..capabilities import Capabilities, ProbeOutcome
from .plan import Accel, DeviceSettings

if TYPE_CHECKING:  # only annotations here: the daemon's start imports no QMP code
    from .gldisplay import Screendump
    from .migration import IncomingResult, MigrationResult


class Step(enum.Enum):
    """The purpose of one launch."""

    BARE = "bare"  # no device: QEMU and sandbox self-test
    DISCOVER = "discover"  # display=auto, migration=auto, migrate the paused VM
    DISPLAY_OFF = "display-off"  # the display is known; learn about migration
    MIGRATION_OFF = "migration-off"  # migration is known (refused at realize); learn the display
    TRACKING_OFF = "tracking-off"  # migrate again without device dirty tracking
    LOAD = "load"  # -incoming defer: load the saved state into a fresh QEMU
    GL = "gl"  # display=on under egl-headless on a render node: does this host set it up?


@dataclass(frozen=True)
class Attempt:
    """One launch to make."""

    step: Step
    settings: DeviceSettings | None
    accel: Accel
    render_node: Path | None = None  # OpenGL through egl-headless on this node
    groups: tuple[int, ...] = ()  # supplementary groups QEMU gets for this launch only

    @property
    def purpose(self) -> str:
        """The launch's purpose as recorded in its :class:`LaunchRecord`."""
        return self.step.value


class LaunchEnd(enum.Enum):
    """How a launch ended."""

    QUIT = "quit"  # the session completed and QEMU quit when asked
    EXITED = "exited"  # QEMU exited on its own (realize failure, error)
    CRASHED = "crashed"  # QEMU died from a signal we did not send
    TIMEOUT = "timeout"  # we killed it at the deadline


@dataclass(frozen=True)
class LaunchObservation:
    """Everything one launch showed: how it ended, stderr, and what QMP answered."""

    attempt: Attempt
    end: LaunchEnd
    started: bool  # the QMP session was established
    exit_status: int | None = None
    stderr: str = ""
    qmp_error: str = ""
    consoles: Mapping[str, str] = field(default_factory=dict)  # console -> device QOM path
    blocked_reasons: tuple[str, ...] = ()
    migration: MigrationResult | None = None
    incoming: IncomingResult | None = None
    qemu_version: str = ""
    screendump: Screendump | None = None


@dataclass(frozen=True)
class Verdict:
    """The end of a probe."""

    outcome: ProbeOutcome
    capabilities: Capabilities | None = None
    error: str = ""
    stderr_excerpt: str = ""
    notes: tuple[str, ...] = ()
