"""A process of its own that holds an owner lock, as a running daemon does (for record tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOLDER = """
import sys, time
from pathlib import Path
from vfiocaps.statefile import OwnerLock
Path(sys.argv[1]).mkdir(mode=0o700, exist_ok=True)
OwnerLock(Path(sys.argv[1])).hold()
print("held", flush=True)
time.sleep(60)
"""


def owner_lock_holder(directory: Path) -> subprocess.Popen[str]:
    """Start a process that holds its owner lock in *directory*; return once it does. The
    caller kills it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "held":
        process.kill()
        process.wait()
        raise RuntimeError("the owner lock holder did not start")
    return process
