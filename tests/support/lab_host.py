"""Whether this host can run the real-kernel lab (tests/lab/run), and where its runner is."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .harness import REPO

RUNNER = REPO / "tests" / "lab" / "run"


def skip_reason() -> str | None:
    """Why the lab cannot run here, or None (``VFIOCAPS_LAB=0`` skips, ``=1`` forces)."""
    wanted = os.environ.get("VFIOCAPS_LAB", "")
    if wanted == "0":
        return "VFIOCAPS_LAB=0"
    if wanted != "1" and not Path("/dev/kvm").exists():
        return "no /dev/kvm: not a virtualization host (set VFIOCAPS_LAB=1 to run the lab anyway)"
    if os.geteuid() != 0 and not (
        shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], check=False).returncode == 0
    ):
        return "the lab build needs root or a password-less sudo (mmdebstrap, apt-get)"
    return None
