"""The test run of ``scripts/run-tests``: its phases, their times, the check that it left nothing.

A full run starts the real-kernel lab (one TCG guest, mostly one host thread) in the background,
runs the parallel-safe tests beside it on pytest-xdist workers, then the tests that are not
parallel-safe (``serial``, see tests/conftest.py) one at a time, waits for the lab and prints a
table of the phases. ``--quick`` runs only the in-process and unit tests (``quick``). Any other
arguments go to one plain pytest run. Every phase runs with a temporary directory of the run's
own as TMPDIR; at the end nothing may be left in it, no process may name it, and no process the
run started may still be running (the runner is their subreaper: what escaped its parent comes
to it). Exit status: 0 when every phase passed and nothing was left behind, else 1.

Usage: scripts/run-tests [--quick] [PYTEST-ARGS...]   (this file is run by scripts/run-tests)
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from support.leftovers import files_under, processes_naming  # noqa: E402 - the path set above
from support.phases import QUICK  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent
PR_SET_CHILD_SUBREAPER = 36
NO_TESTS_RAN = 5
COUNTED = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


def scratch_parent() -> Path:
    """Where the run's TMPDIR goes: $VFIOCAPS_TEST_TMPDIR, else /dev/shm when it is a tmpfs that
    allows device nodes and programs (tests make both) with 4 GiB free: the tests make and
    remove many small files and SQLite databases, which on a busy disk takes long. Else /tmp."""
    chosen = os.environ.get("VFIOCAPS_TEST_TMPDIR", "")
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mountpoint, kind, options, *_ = line.split()
        if mountpoint == str(shm) and kind == "tmpfs":
            allowed = not {"nodev", "noexec", "ro"} & set(options.split(","))
            if allowed and shutil.disk_usage(shm).free >= 4 << 30:
                return shm
    return Path(tempfile.gettempdir())


def workers() -> int:
    """How many xdist workers: $VFIOCAPS_TEST_WORKERS, else one per core."""
    wanted = os.environ.get("VFIOCAPS_TEST_WORKERS", "")
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else os.cpu_count() or 1


@dataclass
class Phase:
    """One pytest run of the suite: its arguments, and once run, its outcome."""

    name: str
    args: list[str]
    background: bool = False
    status: int | None = None
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    started: float = 0.0

    def start(self, env: dict[str, str], basetemp: Path) -> None:
        command = [sys.executable, "-m", "pytest", f"--basetemp={basetemp}", *self.args]
        print(f"run-tests: phase {self.name}: {' '.join(command[1:])}", flush=True)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, ended with it on an interrupt
        )
        echo = None if self.background else sys.stdout
        self.reader = threading.Thread(target=self._read, args=(echo,), daemon=True)
        self.reader.start()

    def _read(self, echo: IO[str] | None) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if echo is not None:
                echo.write(line)
                echo.flush()
        self.process.stdout.close()

    def wait(self) -> int:
        assert self.process is not None
        assert self.reader is not None
        self.status = self.process.wait()
        self.reader.join()
        self.seconds = time.monotonic() - self.started
        if self.background:
            print(f"run-tests: output of phase {self.name}:", flush=True)
            sys.stdout.write("".join(self.output))
        if self.status == NO_TESTS_RAN:
            print(f"run-tests: phase {self.name} ran no test; that is a failure", flush=True)
        return self.status

    def interrupt(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)

    @property
    def tests(self) -> str:
        """How many tests ran, from pytest's closing line ("-" when it has none)."""
        for line in reversed(self.output):
            counts = COUNTED.findall(line)
            if counts and " in " in line:
                return str(sum(int(number) for number, _ in counts))
        return "-"

    @property
    def result(self) -> str:
        if self.status == 0:
            return "passed"
        return "no tests" if self.status == NO_TESTS_RAN else f"failed ({self.status})"


def plan(arguments: list[str]) -> list[Phase]:
    """The phases for *arguments*: the full suite, the quick one, or a plain pytest run."""
    if arguments[:1] == ["--quick"]:
        # The quick modules by name: only they are collected (importing the others takes long).
        files = [f"tests/{module}.py" for module in sorted(QUICK)]
        quick = ["-q", "-n", str(workers()), "-m", "quick", *files, *arguments[1:]]
        return [Phase("quick", quick)]
    if arguments:
        return [Phase("pytest", arguments)]
    parallel = ["-q", "-n", str(workers()), "--dist", "loadfile", "-m", "not lab and not serial"]
    return [
        Phase("lab", ["-q", "-m", "lab", "tests/lab"], background=True),
        Phase("parallel", parallel),
        Phase("serial", ["-q", "-m", "serial and not lab"]),
    ]


def reap() -> list[str]:
    """Collect this process's dead children; name the live ones (left running by the run)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    live = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            command = argv.replace(b"\0", b" ").decode(errors="replace").strip()
            live.append(f"{child} {command}")
    return live


def leftovers(run: Path, basetemps: list[Path]) -> list[str]:
    """What the run left: files in its TMPDIR (pytest's own directories aside, which the runner
    removes), processes naming it, processes it started that still run."""
    found = [f"process {pid}: {argv}" for pid, argv in processes_naming(run).items()]
    found += [f"process {line} (started by the run)" for line in reap()]
    for path in basetemps:
        shutil.rmtree(path, ignore_errors=True)
    found += [f"file {run / name}" for name in files_under(run)]
    return found


def table(phases: list[Phase], left: list[str], checked: float, seconds: float) -> str:
    rows = [("phase", "tests", "seconds", "result")]
    rows += [(p.name, p.tests, f"{p.seconds:.1f}", p.result) for p in phases]
    rows.append(("leftovers", "-", f"{checked:.1f}", "none" if not left else f"{len(left)} found"))
    rows.append(("total", "-", f"{seconds:.1f}", "passed" if passed(phases, left) else "FAILED"))
    return "\n".join(f"{a:<10} {b:>6} {c:>8}  {d}" for a, b, c, d in rows)


def passed(phases: list[Phase], left: list[str]) -> bool:
    return not left and all(phase.status == 0 for phase in phases)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(arguments: list[str]) -> int:
    started = time.monotonic()
    # A stop from outside (a CI time limit, a closed terminal) ends the phases as Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # The run's own TMPDIR: every temporary file of every test goes there. The probe user must
    # be able to enter it (probe scratch directories are made in it).
    run = Path(tempfile.mkdtemp(prefix="vfiocaps-tests-", dir=scratch_parent()))
    run.chmod(0o755)
    env = {**os.environ, "TMPDIR": str(run)}
    phases = plan(arguments)
    basetemps = [run / f"pytest-{phase.name}" for phase in phases]
    interrupted = False
    try:
        for phase, basetemp in zip(phases, basetemps, strict=True):
            if phase.background:
                phase.start(env, basetemp)
        for phase, basetemp in zip(phases, basetemps, strict=True):
            if not phase.background:
                phase.start(env, basetemp)
                phase.wait()
        for phase in phases:
            if phase.background:
                phase.wait()
    except KeyboardInterrupt:
        interrupted = True
        for phase in phases:
            phase.interrupt()
        for phase in phases:
            if phase.process is not None and phase.status is None:
                phase.wait()
    checking = time.monotonic()
    left = leftovers(run, basetemps)
    checked = time.monotonic() - checking
    for line in left:
        print(f"run-tests: left behind: {line}", flush=True)
    if left:
        print(f"run-tests: {run} is kept for a look; remove it afterwards", flush=True)
    else:
        run.rmdir()
    summary = table(phases, left, checked, time.monotonic() - started)
    print(f"\nrun-tests: phases\n{summary}", flush=True)
    if interrupted or passed(phases, left):
        return 1 if interrupted else 0
    failed = [phase.status for phase in phases if phase.status not in (0, None)]
    return failed[0] if failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
