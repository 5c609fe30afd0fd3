"""The least a probe launch can cost: a bare QEMU start-QMP-quit as the probe's user and groups.

Shared by the probe-cost stage on this host (``bench/probes.py``), the naive way
(``bench/naive_probe.py``) and the lab benchmark inside the real-kernel guest
(``tests/lab/guest/bench_lab.py``); it imports only vfiocaps and the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from vfiocaps.prober import Accel, ProbePlan, Prober, build_qemu_argv, machine_for_architecture
from vfiocaps.process import Credentials


@dataclass
class Stages:
    """When one launch reached each moment (``time.monotonic()``)."""

    began: float = 0.0
    started: float = 0.0  # the QEMU process exists
    qmp_ready: float = 0.0  # the QMP session is established
    ended: float = 0.0  # QEMU has been reaped

    def split(self) -> dict[str, float]:
        """Seconds of each part of the launch, and in all."""
        return {
            "spawn": self.started - self.began,
            "handshake": self.qmp_ready - self.started,
            "session": self.ended - self.qmp_ready,
            "total": self.ended - self.began,
        }


async def bare_qemu(binary: Path, accel: Accel, credentials: Credentials | None) -> Stages:
    """Start QEMU with no device and the QMP monitor on a socketpair as *credentials* (the
    probe's user and groups), handshake, quit, reap: the least a probe launch can cost.

    Raises:
        RuntimeError: QEMU exited with a non-zero status.
    """
    from qemu.qmp import QMPClient

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    plan = ProbePlan(
        machine=machine_for_architecture(None),
        accel=accel,
        vm_uuid=str(uuid.uuid4()),
        qmp_fd=theirs.fileno(),
        sandbox=False,
    )
    stages = Stages(began=time.monotonic())
    process = await asyncio.create_subprocess_exec(
        *build_qemu_argv(binary, plan),
        pass_fds=(theirs.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=credentials.uid if credentials else None,
        group=credentials.gid if credentials else None,
        extra_groups=list(credentials.groups) if credentials else None,
    )
    stages.started = time.monotonic()
    theirs.close()
    client = QMPClient("bench-floor")
    await client.connect(ours)
    stages.qmp_ready = time.monotonic()
    await client.execute("quit")
    await process.wait()
    stages.ended = time.monotonic()
    with contextlib.suppress(EOFError):  # QEMU closes the socket as it quits
        await client.disconnect()
    ours.close()
    if process.returncode != 0:
        raise RuntimeError(f"the bare QEMU exited with status {process.returncode}")
    return stages


async def self_test_accel(prober: Prober) -> Accel:
    """Run the prober's self-test (no device) once and return the accelerator it chose.

    Raises:
        RuntimeError: the self-test failed.
    """
    report = await prober.check_qemu()
    if report.outcome.value != "ok":
        raise RuntimeError(f"the prober's self-test failed: {report.error}")
    machine = next(a for a in report.launches[-1].argv if "accel=" in a)
    return Accel.KVM if "accel=kvm" in machine else Accel.TCG
