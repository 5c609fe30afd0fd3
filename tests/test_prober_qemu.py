"""The prober against the real qemu-system-x86_64: bare session, timeout, crash, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support.prober import REAL_QEMU, leftovers, make_readable, node_state, probe_user, scratch
from vfiocaps.capabilities import ProbeOutcome
from vfiocaps.config import Config
from vfiocaps.prober import LaunchEvent, LaunchStage, Prober, QemuMissingError

pytestmark = pytest.mark.skipif(REAL_QEMU is None, reason="qemu-system-x86_64 is not installed")

__all__ = ["probe_user", "scratch"]  # fixtures


def config(scratch: Path, probe_user: str, **overrides: object) -> Config:
    values: dict[str, object] = {
        "runtime_dir": scratch / "run",
        "qemu_binary": Path(REAL_QEMU or "/usr/bin/qemu-system-x86_64"),
        "probe_user": probe_user,
        "probe_timeout": 20.0,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


def gone(pid: int) -> bool:
    """True when *pid* no longer exists, not even as a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Recorder:
    """A launch observer that remembers events and can act on one stage."""

    def __init__(self, stage: LaunchStage | None = None, act: Callable[[int], None] | None = None):
        self.events: list[LaunchEvent] = []
        self.stage = stage
        self.act = act

    def __call__(self, event: LaunchEvent) -> None:
        self.events.append(event)
        if event.stage is self.stage and self.act is not None:
            self.act(event.pid)

    @property
    def pids(self) -> set[int]:
        return {event.pid for event in self.events}


async def test_identity_of_the_installed_qemu(scratch: Path, probe_user: str) -> None:
    prober = Prober(config(scratch, probe_user))
    identity = await prober.read_qemu()
    assert identity.path == str(REAL_QEMU)  # as configured: the cache keys on that name
    assert identity.version_tuple >= (7, 0)
    resolved = Path(REAL_QEMU or "").resolve().stat()
    assert (identity.ctime_ns, identity.size) == (resolved.st_ctime_ns, resolved.st_size)
    assert identity.vfio_pci_properties is None  # not asked for serving
    identity = await prober.read_qemu_properties(identity)
    assert identity.vfio_pci_properties is not None
    assert {"sysfsdev", "display"} <= identity.vfio_pci_properties
    # A probe handed the identity launches only its own QEMU: no -version, no -device help.
    report = await prober.check_qemu(identity)
    assert report.outcome is ProbeOutcome.OK, report
    assert len(report.launches) == 1
    assert "-version" not in report.launches[0].argv


async def test_missing_qemu_raises_from_identity_and_is_an_outcome_of_probe(
    scratch: Path, probe_user: str
) -> None:
    prober = Prober(config(scratch, probe_user, qemu_binary=scratch / "no-such-qemu"))
    with pytest.raises(QemuMissingError):
        await prober.read_qemu()
    report = await prober.check_qemu()
    assert report.outcome is ProbeOutcome.QEMU_MISSING
    assert report.launches == ()


async def test_bare_probe_start_qmp_quit(scratch: Path, probe_user: str) -> None:
    kvm = Path("/dev/kvm")
    kvm_before = node_state(kvm) if kvm.exists() else None
    recorder = Recorder()
    prober = Prober(config(scratch, probe_user), observer=recorder)
    started = time.monotonic()
    report = await prober.check_qemu()
    wall = time.monotonic() - started
    assert report.outcome is ProbeOutcome.OK, report
    assert len(report.launches) == 1
    launch = report.launches[0]
    assert launch.purpose == "bare"
    assert launch.exit_status == 0
    assert 0 < launch.duration <= wall
    print(f"bare probe: launch {launch.duration:.3f} s, wall {wall:.3f} s")
    assert [event.stage for event in recorder.events] == [
        LaunchStage.STARTED,
        LaunchStage.QMP_READY,
        LaunchStage.ENDED,
    ]
    assert all(gone(pid) for pid in recorder.pids)
    assert leftovers(scratch / "run") == []
    saved = [note for note in report.notes if note.startswith("the paused VM saved")]
    assert saved, report.notes
    assert int(saved[0].split()[4]) > 64 * 1024  # a QEMU migration stream of a 64 MiB VM
    if kvm_before is not None:
        assert node_state(kvm) == kvm_before
    if os.geteuid() == 0:
        assert any(f"QEMU runs as {probe_user}" in note for note in report.notes)
    else:
        assert any("not root" in note for note in report.notes)


async def test_stopped_qemu_times_out_and_is_reaped(scratch: Path, probe_user: str) -> None:
    recorder = Recorder(LaunchStage.STARTED, lambda pid: os.kill(pid, signal.SIGSTOP))
    prober = Prober(config(scratch, probe_user, probe_timeout=1.5), observer=recorder)
    started = time.monotonic()
    report = await prober.check_qemu()
    elapsed = time.monotonic() - started
    assert report.outcome is ProbeOutcome.TIMEOUT, report
    assert 1.5 <= elapsed < 6
    assert report.launches[0].exit_status == -signal.SIGKILL
    assert all(gone(pid) for pid in recorder.pids)
    assert leftovers(scratch / "run") == []


async def test_killed_qemu_is_a_crash(scratch: Path, probe_user: str) -> None:
    recorder = Recorder(LaunchStage.QMP_READY, lambda pid: os.kill(pid, signal.SIGKILL))
    prober = Prober(config(scratch, probe_user), observer=recorder)
    report = await prober.check_qemu()
    assert report.outcome is ProbeOutcome.CRASHED, report
    assert "SIGKILL" in report.error
    assert report.launches[0].exit_status == -signal.SIGKILL
    assert all(gone(pid) for pid in recorder.pids)
    assert leftovers(scratch / "run") == []


async def test_cancelling_a_probe_kills_and_reaps_qemu(scratch: Path, probe_user: str) -> None:
    kvm = Path("/dev/kvm")
    kvm_before = node_state(kvm) if kvm.exists() else None
    ready = asyncio.Event()
    recorder = Recorder(
        LaunchStage.STARTED, lambda pid: (os.kill(pid, signal.SIGSTOP), ready.set())
    )
    prober = Prober(config(scratch, probe_user), observer=recorder)
    task = asyncio.create_task(prober.check_qemu())
    await asyncio.wait_for(ready.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorder.pids
    assert all(gone(pid) for pid in recorder.pids)
    assert leftovers(scratch / "run") == []
    assert prober.grants.active() == {}
    if kvm_before is not None:
        assert node_state(kvm) == kvm_before


async def test_unknown_device_failure_is_reported_with_an_excerpt(
    scratch: Path, probe_user: str
) -> None:
    """Real QEMU given a directory that is no VFIO device: an unrecognised failure."""
    from support.prober import FakeHost
    from vfiocaps.prober import ProbeTarget

    host = FakeHost(scratch / "host")
    device = host.add_mdev("6a1b3c5d-0000-4000-8000-00000000abcd", "mtty-1", "mtty", "7")
    make_readable(scratch)
    node = host.dev / "vfio" / "7"
    before = node_state(node)
    prober = Prober(config(scratch, probe_user, dev_root=host.dev))
    report = await prober.probe(ProbeTarget.from_sysfs(device, host.sysfs))
    assert report.outcome is ProbeOutcome.FAILED, report
    assert report.stderr_excerpt
    assert "6a1b3c5d-0000-4000-8000-00000000abcd" in report.stderr_excerpt
    assert len(report.launches) == 1
    print(f"unrecognised failure excerpt: {report.stderr_excerpt}")
    assert node_state(node) == before
    assert leftovers(scratch / "run") == []
