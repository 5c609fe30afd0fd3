"""Large buffers that were freed do not stay resident (see ``vfiocaps.memory``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DAEMON_SOURCE = Path(__file__).resolve().parent.parent / "daemon"

# Grows a buffer the way a marshalled reply grows, keeps something allocated after it (as the
# daemon always does), frees the buffer, and prints how many MiB stayed resident.
SCENARIO = """
import sys
sys.path.insert(0, sys.argv[1])
from vfiocaps.memory import return_large_buffers

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

if sys.argv[2] == "fixed":
    assert return_large_buffers()
before = resident_mib()
kept = []
for _ in range(4):
    reply = bytearray()
    for _ in range(2000):
        reply += b"y" * 8192
    kept.append(b"k" * 4096)
    del reply
print(resident_mib() - before)
"""


def _retained_mib(variant: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(DAEMON_SOURCE), variant],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return float(out)


def test_freed_reply_buffers_are_given_back() -> None:
    control = _retained_mib("default")
    fixed = _retained_mib("fixed")
    # Without the setting, glibc keeps most of the 16 MiB buffer resident; with it, none.
    assert control >= 8, f"the scenario no longer shows the retention ({control:.1f} MiB)"
    assert fixed <= 2, f"{fixed:.1f} MiB stayed resident (without the setting: {control:.1f})"
