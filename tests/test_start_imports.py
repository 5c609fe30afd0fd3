"""What the daemon's start imports: it serves before its first probe, so the launch code (QMP,
the strategy, the kernel's facts) and the standard library's web modules wait until needed."""

from __future__ import annotations

import json
import subprocess
import sys

from support.harness import REPO

NOT_AT_START = (
    "qemu.qmp",
    "vfiocaps.prober.launch",
    "vfiocaps.prober.strategy",
    "vfiocaps.prober.kernelfacts",
    "vfiocaps.prober.evidence",
    "vfiocaps.prober.gldisplay",
    "vfiocaps.prober.single",
    "vfiocaps.prober.target",
    "uuid",
    "platform",
    "xml.sax",
    "urllib.request",
    "http.client",
    "email",
)


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, timeout=60, cwd=REPO,
        env={"PYTHONPATH": str(REPO / "daemon"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    return set(json.loads(out.stdout))


def test_the_daemon_starts_without_the_launch_code() -> None:
    loaded = _modules_after("import vfiocaps.daemon")
    early = sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_AT_START))
    assert early == []


def test_a_probe_still_finds_the_launch_code() -> None:
    loaded = _modules_after(
        "import vfiocaps.daemon\nfrom vfiocaps.prober import launch, strategy, kernelfacts"
    )
    assert {"qemu.qmp", "vfiocaps.prober.launch", "vfiocaps.prober.strategy"} <= loaded
