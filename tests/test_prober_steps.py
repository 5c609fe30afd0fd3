"""A probe's time per step outside its QEMU launches: the lap clock and the prober's debug line."""

from __future__ import annotations

import grp
import logging
import os
import re
import stat
import time
from pathlib import Path

import pytest

from support.prober import FakeHost, fake_host, fake_qemu_config, probe_user, scratch
from vfiocaps.capabilities import ProbeOutcome
from vfiocaps.prober import Prober, ProbeTarget, sandbox
from vfiocaps.prober import prober as prober_module
from vfiocaps.prober.sandbox import ProbeIdentity, kvm_access
from vfiocaps.prober.steptimes import LAUNCHES, StepClock
from vfiocaps.process import Credentials

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

MTTY = "11111111-2222-4333-8444-0000000000a1"
LINE = re.compile(
    r"^probe of (?P<device>\S+): outside launches (?P<outside>[0-9.]+) s"
    r"(?:: (?P<steps>[^;]*))?; launches (?P<launches>[0-9.]+) s$"
)


def test_laps_name_the_time_since_the_previous_mark_and_add_up_by_name() -> None:
    ticks = iter([10.0, 10.5, 11.0, 14.0, 14.25, 14.5])
    clock = StepClock(lambda: next(ticks))
    assert clock.lap("grant") == 0.5
    clock.lap("features")
    clock.lap(LAUNCHES)
    clock.lap("grant")
    assert clock.steps == {"grant": 0.75, "features": 0.5, LAUNCHES: 3.0}
    assert clock.outside() == 1.25
    assert clock.elapsed() == 4.5
    assert clock.summary() == (
        "outside launches 1.250 s: grant 0.750, features 0.500; launches 3.000 s"
    )
    clock.move(LAUNCHES, "between launches", 0.25)
    clock.move("features", "fork", 9.0)  # never more than the step holds
    assert clock.steps == {
        "grant": 0.75,
        "features": 0.0,
        "fork": 0.5,
        LAUNCHES: 2.75,
        "between launches": 0.25,
    }
    assert clock.outside() == 1.5


def test_a_clock_that_steps_back_never_makes_a_negative_step() -> None:
    ticks = iter([5.0, 4.0, 4.5])
    clock = StepClock(lambda: next(ticks))
    assert clock.lap("identity") == 0.0
    assert clock.lap("binary") == 0.5
    assert clock.outside() == 0.5


async def test_the_probe_logs_its_steps_and_they_add_up_to_no_more_than_its_time(
    scratch: Path, fake_host: FakeHost, probe_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    device = fake_host.add_mdev(MTTY, "mtty-1", "mtty", "0")
    prober = Prober(fake_qemu_config(scratch, fake_host, probe_user))
    target = ProbeTarget.from_sysfs(device, fake_host.sysfs)
    caplog.set_level(logging.DEBUG, logger="vfiocaps.prober")
    began = time.monotonic()
    report = await prober.probe(target)
    took = time.monotonic() - began
    assert report.outcome is ProbeOutcome.OK, report
    lines = [m for r in caplog.records if (m := LINE.match(r.getMessage())) is not None]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    line = lines[0]
    assert line["device"] == MTTY
    steps = {
        name: float(seconds)
        for name, seconds in (part.rsplit(" ", 1) for part in line["steps"].split(", "))
    }
    # Every step of a root probe of a device shows, the launches apart.
    assert {"device scan", "identity", "binary", "checks", "sandbox", "grant"} <= set(steps)
    assert {"features", "plan", "between launches"} <= set(steps)
    assert {"release", "report"} <= set(steps)
    outside, launches = float(line["outside"]), float(line["launches"])
    assert outside == pytest.approx(sum(steps.values()), abs=0.001 * len(steps))
    # The launches' step is the launches the report counts; nothing is counted twice.
    assert launches == pytest.approx(report.duration, abs=0.002)
    assert outside + launches <= took + 0.001


def kvm_node_of_group(dev: Path, group: str) -> Path:
    """A /dev/kvm in *dev*: the host's device, ``root:GROUP 0660`` (reached through its group)."""
    dev.mkdir(parents=True, exist_ok=True)
    node = dev / "kvm"
    os.mknod(node, stat.S_IFCHR | 0o660, os.stat("/dev/kvm").st_rdev)
    node.chmod(0o660)  # mknod's mode passes through the umask
    os.chown(node, 0, grp.getgrnam(group).gr_gid)
    return node


@pytest.mark.skipif(os.geteuid() != 0, reason="only root checks the probe user's groups")
@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm")
async def test_a_probe_scans_the_device_nodes_once_for_all_its_group_checks(
    scratch: Path, fake_host: FakeHost, probe_user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe user's groups and /dev/kvm's group (reached through the group: the probe
    scans the nodes for both) are checked against one scan of the device root."""
    device = fake_host.add_mdev(MTTY, "mtty-1", "mtty", "0")
    kvm_node_of_group(fake_host.dev, "kvm")
    scans: list[Path] = []
    real_scan = sandbox.device_nodes_by_group

    def counting_scan(dev_root: Path) -> dict[int, list[Path]]:
        scans.append(dev_root)
        return real_scan(dev_root)

    monkeypatch.setattr(sandbox, "device_nodes_by_group", counting_scan)
    monkeypatch.setattr(prober_module, "device_nodes_by_group", counting_scan, raising=False)
    prober = Prober(fake_qemu_config(scratch, fake_host, probe_user))
    qemu = await prober.read_qemu_properties(await prober.read_qemu())  # as the engine hands it
    scans.clear()
    report = await prober.probe(ProbeTarget.from_sysfs(device, fake_host.sysfs), qemu)
    assert report.outcome is ProbeOutcome.OK, report
    assert "accel=kvm" in " ".join(report.launches[0].argv)  # through the kvm group
    assert scans == [fake_host.dev]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chown need root")
@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm")
def test_the_probes_scan_refuses_what_a_fresh_scan_refuses(tmp_path: Path) -> None:
    """A scan handed to the checks gives the answers of a scan made by the check itself: the
    kvm group that also owns a disk is not given to QEMU (the node is lent instead)."""
    identity = ProbeIdentity(Credentials(4242, 4242, (4242,)), "u")
    kvm_node_of_group(tmp_path, "kvm")
    clean = sandbox.device_nodes_by_group(tmp_path)
    assert (kvm_access(tmp_path, identity, clean).group, kvm_access(tmp_path, identity).group) == (
        grp.getgrnam("kvm").gr_gid,
        grp.getgrnam("kvm").gr_gid,
    )
    disk = tmp_path / "sdz"
    os.mknod(disk, stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.chown(disk, 0, grp.getgrnam("kvm").gr_gid)
    scanned = sandbox.device_nodes_by_group(tmp_path)
    for access in (kvm_access(tmp_path, identity, scanned), kvm_access(tmp_path, identity)):
        assert (access.usable, access.group, access.needs_grant) == (True, None, True)
