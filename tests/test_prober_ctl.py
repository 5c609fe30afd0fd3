"""``vfiocapsctl probe``: a one-shot local probe, run as a real command against the fake QEMU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.prober import (
    FakeHost,
    fake_host,
    install_fake_qemu,
    leftovers,
    make_readable,
    probe_user,
    scratch,
)

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

MDPY = "22222222-3333-4444-8555-000000000001"
NOBODY = 65534


def vfiocapsctl(
    scratch: Path, host: FakeHost, probe_user: str, *args: str, overrides: Any = None
) -> subprocess.CompletedProcess[str]:
    qemu = install_fake_qemu(scratch / "qemu", overrides)
    make_readable(scratch)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiocaps.ctl",
            "probe",
            *args,
            "--sysfs-root",
            str(host.sysfs),
            "--dev-root",
            str(host.dev),
            "--runtime-dir",
            str(scratch / "run"),
            "--qemu",
            str(qemu),
            "--probe-user",
            probe_user,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_probe_by_uuid_prints_json(scratch: Path, fake_host: FakeHost, probe_user: str) -> None:
    fake_host.add_mdev(MDPY, "mdpy-vga", "mdpy", "3", parent="mdpy")
    result = vfiocapsctl(scratch, fake_host, probe_user, MDPY, "--json")
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["Device"] == str(fake_host.sysfs / "bus" / "mdev" / "devices" / MDPY)
    assert values["Outcome"] == "ok"
    assert values["Capabilities"]["Display"] == "region"
    assert values["Capabilities"]["GlRequired"] is False
    assert values["Capabilities"]["Migration"] == "unsupported"
    assert values["Launches"][0]["Purpose"] == "discover"
    assert values["Launches"][0]["Argv"][0].endswith("qemu-system-x86_64")
    assert leftovers(scratch / "run") == []


def test_probe_by_path_prints_a_table(scratch: Path, fake_host: FakeHost, probe_user: str) -> None:
    device = fake_host.add_mdev(MDPY, "mbochs-small", "mbochs", "3", parent="mbochs")
    result = vfiocapsctl(scratch, fake_host, probe_user, str(device))
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["outcome"].strip() == "ok"
    assert lines["display"].strip() == "dmabuf"
    assert lines["gl"].strip() == "required"


def test_busy_device_exits_4(scratch: Path, fake_host: FakeHost, probe_user: str) -> None:
    fake_host.add_mdev(MDPY, "mdpy-vga", "mdpy", "3", parent="mdpy")
    overrides = {"devices": {MDPY: {"busy": True}}}
    result = vfiocapsctl(scratch, fake_host, probe_user, MDPY, "--json", overrides=overrides)
    assert result.returncode == 4, result.stderr
    assert json.loads(result.stdout)["Outcome"] == "busy"


def test_failure_exits_1(scratch: Path, fake_host: FakeHost, probe_user: str) -> None:
    fake_host.add_mdev(MDPY, "strange-1", "strange", "3", parent="strange")
    result = vfiocapsctl(scratch, fake_host, probe_user, MDPY)
    assert result.returncode == 1, result.stderr
    assert "failed" in result.stdout
    assert "QEMU said:" in result.stdout


def test_unknown_uuid_and_foreign_paths_exit_2(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    fake_host.add_mdev(MDPY, "mdpy-vga", "mdpy", "3", parent="mdpy")
    missing = vfiocapsctl(scratch, fake_host, probe_user, "22222222-3333-4444-8555-0000000000ff")
    assert missing.returncode == 5
    assert "no device" in missing.stderr
    outside = vfiocapsctl(scratch, fake_host, probe_user, str(scratch))
    assert outside.returncode == 2
    assert "is not under" in outside.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_unprivileged_vfiocapsctl_runs_qemu_as_itself(scratch: Path, fake_host: FakeHost) -> None:
    """Not root: nothing is granted, QEMU runs as the caller, and the report says so."""
    fake_host.add_mdev(MDPY, "mdpy-vga", "mdpy", "3", parent="mdpy")
    node = fake_host.dev / "vfio" / "3"
    os.chown(node, NOBODY, -1)  # the caller's own node, as a udev rule could arrange
    (scratch / "run").mkdir(mode=0o700)
    os.chown(scratch / "run", NOBODY, -1)
    qemu = install_fake_qemu(scratch / "qemu")
    make_readable(scratch)
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--",
            sys.executable,
            "-m",
            "vfiocaps.ctl",
            "probe",
            MDPY,
            "--json",
            "--sysfs-root",
            str(fake_host.sysfs),
            "--dev-root",
            str(fake_host.dev),
            "--runtime-dir",
            str(scratch / "run"),
            "--qemu",
            str(qemu),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"},
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["Capabilities"]["Display"] == "region"
    expected = f"not root: QEMU runs as vfiocapsd's own user (uid {NOBODY})"
    assert any(expected in note for note in values["Notes"])
    assert node.stat().st_uid == NOBODY
    assert leftovers(scratch / "run") == []
