"""The real-kernel lab benchmark: boots the lab guest with ``tests/lab/run --bench`` and returns
the figures its ``tests/lab/guest/bench_lab.py`` measured on the kernel's sample mdev drivers."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Progress
from support.lab_host import RUNNER, skip_reason

REPEATS = 3
# Boot and install (about 2.5 minutes under TCG) plus the benchmark; a cold build adds minutes.
LAB_TIMEOUT = 1800
# What the run leaves beside the figures, copied next to the other results.
KEPT = ("bench.json", "bench.log", "timings.json", "install.log", "vfiocapsd.log")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


def run(progress: Progress, keep: Path, repeats: int = REPEATS) -> dict[str, Any]:
    """Boot the lab, run its benchmark, copy its files into *keep*; the figures, or why there
    are none (``skipped``: the lab cannot run here; ``failed``: it ran and broke)."""
    reason = skip_reason()
    if reason:
        progress.note(f"skipped: {reason}")
        return {"skipped": reason}
    results = Path(tempfile.mkdtemp(prefix="vfiocaps-bench-lab-"))
    runner_log = results / "runner.log"
    command = [
        str(RUNNER),
        "--bench",
        "--results",
        str(results),
        "--timeout",
        str(LAB_TIMEOUT),
        "--",
        "--repeats",
        str(repeats),
    ]
    began = time.monotonic()
    with runner_log.open("w") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        shown = None
        try:
            while process.poll() is None:
                # The guest writes its progress to the results share as it goes.
                latest = _last_line(results / "bench.log") or _last_line(runner_log)
                if latest != shown:
                    progress.note(latest.removeprefix("lab bench: ").removeprefix("lab: ")[:110])
                    shown = latest
                time.sleep(2)
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait()
    keep.mkdir(parents=True, exist_ok=True)
    for name in (*KEPT, "runner.log"):
        if (results / name).exists():
            shutil.copy(results / name, keep / name)
    figures = results / "bench.json"
    if process.returncode != 0 or not figures.exists():
        failure = (
            f"tests/lab/run --bench exited with status {process.returncode}:\n"
            f"{_tail(runner_log)}\n{_tail(results / 'bench.log')}"
        )
        return {"failed": failure, "results": str(results)}
    data: dict[str, Any] = json.loads(figures.read_text())
    timings = results / "timings.json"
    data["lab_timings"] = json.loads(timings.read_text()) if timings.exists() else {}
    data["lab_wall_s"] = time.monotonic() - began
    data["results"] = str(keep)
    shutil.rmtree(results, ignore_errors=True)
    return data
