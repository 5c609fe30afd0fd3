"""Where a probe's time goes: a lap clock that names each step between two marks."""

from __future__ import annotations

import time
from collections.abc import Callable

LAUNCHES = "launches"  # the QEMU launches' own time (what a probe's launch records hold)


class StepClock:
    """Times consecutive steps: :meth:`lap` closes the step begun at the previous mark (or at
    the start) and names it; a name given twice adds up. *clock* is the time source in seconds
    (monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self._mark = self.started
        self.steps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        """End the current step as *name*; return its seconds."""
        now = self._clock()
        seconds = max(0.0, now - self._mark)
        self._mark = now
        self.steps[name] = self.steps.get(name, 0.0) + seconds
        return seconds

    def move(self, source: str, target: str, seconds: float) -> None:
        """Count up to *seconds* of the step *source* as the step *target* (a step inside it
        that is timed apart), never more than *source* holds."""
        moved = max(0.0, min(seconds, self.steps.get(source, 0.0)))
        self.steps[source] = self.steps.get(source, 0.0) - moved
        self.steps[target] = self.steps.get(target, 0.0) + moved

    def elapsed(self) -> float:
        """Seconds since the clock started."""
        return max(0.0, self._clock() - self.started)

    def outside(self) -> float:
        """The named steps' seconds but the launches'."""
        return sum(s for name, s in self.steps.items() if name != LAUNCHES)

    def summary(self) -> str:
        """``outside launches 0.41 s: grant 0.12, features 0.08, ...``: the steps outside
        the launches, the largest first, then the launches' own step."""
        rest = sorted(
            ((s, name) for name, s in self.steps.items() if name != LAUNCHES), reverse=True
        )
        parts = ", ".join(f"{name} {s:.3f}" for s, name in rest)
        text = f"outside launches {self.outside():.3f} s"
        if parts:
            text += f": {parts}"
        if LAUNCHES in self.steps:
            text += f"; launches {self.steps[LAUNCHES]:.3f} s"
        return text
