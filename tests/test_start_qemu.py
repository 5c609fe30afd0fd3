"""What the daemon's start asks QEMU: its version only, once on an empty cache and not at all
when the cache knows the binary; the vfio-pci properties wait for the first probe."""

from __future__ import annotations

from pathlib import Path

from support.harness import DaemonFactory
from support.prober import PROPERTIES_ASKED, VERSION_ASKED, counting_qemu, probe_user, scratch

__all__ = ["probe_user", "scratch"]  # fixtures


def test_a_cold_start_runs_qemu_once_and_a_warm_start_none(
    scratch: Path, probe_user: str, start_daemon: DaemonFactory
) -> None:
    binary, calls = counting_qemu(scratch)
    empty = scratch / "sys"
    (empty / "bus" / "mdev" / "devices").mkdir(parents=True)
    (empty / "bus" / "pci" / "devices").mkdir(parents=True)
    arguments = ("--qemu", str(binary), "--sysfs-root", str(empty), "--probe-user", probe_user)
    daemon = start_daemon(*arguments)
    assert calls.read_text().splitlines() == [VERSION_ASKED], daemon.log()
    assert daemon.stop() == 0
    again = start_daemon(*arguments)  # the same cache directory
    assert again.alive()
    assert calls.read_text().splitlines() == [VERSION_ASKED], "the warm start launched QEMU"
    assert PROPERTIES_ASKED not in calls.read_text().splitlines()
