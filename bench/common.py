"""Shared pieces of the benchmarks: statistics, progress, processes."""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# The line vfiocapsd logs when a probe ends (vfiocaps.prober.prober): the device (``QEMU`` for the
# self-test), the outcome, the number of QEMU launches and their summed wall time.
PROBE_LOG_LINE = re.compile(
    r"probe of (?P<device>\S+): (?P<outcome>\S+) after (?P<launches>\d+) launch\(es\), "
    r"(?P<seconds>[0-9.]+) s"
)

BENCH_FLOOR_NAME = "org.vfiocaps.BenchFloor"
BENCH_FLOOR_PATH = "/org/vfiocaps/BenchFloor"


def percentile(values: Sequence[float], fraction: float) -> float:
    """The *fraction* quantile of *values* (nearest rank); raises ValueError when empty."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Count, p50, p90, p99, mean, min and max of *values* (seconds)."""
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


class Progress:
    """One status line on stderr (rewritten in place on a terminal), with elapsed time."""

    def __init__(self, total_steps: int) -> None:
        self.total = total_steps
        self.step = 0
        self.began = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.title = ""

    def stage(self, title: str) -> None:
        """Start the next stage."""
        self.step += 1
        self.title = title
        self.note("")

    def note(self, detail: str) -> None:
        """Say where the current stage is."""
        elapsed = time.monotonic() - self.began
        line = f"[{self.step}/{self.total} {elapsed:6.1f}s] {self.title}"
        if detail:
            line += f": {detail}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        """End the display."""
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.write(f"finished in {time.monotonic() - self.began:.1f} s\n")


def descendants(pid: int) -> list[int]:
    """*pid* and every process below it, parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def python_daemon_pid(wrapper_pid: int) -> int:
    """The vfiocapsd interpreter below *wrapper_pid* (``unshare`` → ``umockdev-wrapper``)."""
    for pid in descendants(wrapper_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vfiocaps.daemon" in argv:
            return pid
    raise LookupError(f"no vfiocapsd below process {wrapper_pid}")


@dataclass(frozen=True)
class Memory:
    """Resident memory of one process, in KiB."""

    rss_kib: int
    hwm_kib: int


def memory_of(pid: int) -> Memory:
    """VmRSS and VmHWM of *pid*; raises OSError when it is gone."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return Memory(values["VmRSS"], values["VmHWM"])


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User plus system CPU time of *pid* so far (with *children*: plus that of its reaped
    children, e.g. a QEMU it ran)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


async def add_match(bus: Any, rule: str) -> None:
    """Ask the bus daemon to route the signals *rule* matches to *bus* (a dbus-fast connection).

    Raises:
        RuntimeError: the bus daemon refused the rule.
    """
    from dbus_fast import Message

    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )
    if reply is None or reply.error_name:
        raise RuntimeError(f"the bus refused the match rule {rule!r}: {reply and reply.body}")
