"""The Debian package's life on the guest's real systemd: upgrade, remove, purge, install again.

Runs last (its name sorts after every numbered test): the package the lab installed
(``VFIOCAPS_LAB_PACKAGE``, built on the host by ``make deb``) is reinstalled over itself (the
upgrade path: a running daemon is restarted on the new files), removed (the service stops, its
cache stays), purged (nothing of it stays) and installed again, after which bus activation
alone must bring the daemon back. The upgrade, removal and purge use dpkg; the last install,
like the lab's first, uses apt.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from labkit import BUS_NAME, Daemon, busctl, wait_for

PACKAGE = "vfiocaps"
CACHE = Path("/var/cache/vfiocaps")
RUNTIME = Path("/run/vfiocaps")
# Where a file of the package's, or one the daemon made, could be left behind.
SEARCHED = ("/usr", "/etc", "/var/cache", "/var/lib/vfiocaps", "/run")


def deb() -> Path:
    found = os.environ.get("VFIOCAPS_LAB_PACKAGE", "")
    if not found:
        pytest.fail("the lab installed no package (VFIOCAPS_LAB_PACKAGE is empty)")
    return Path(found)


def packaging(*argv: str) -> str:
    """Run apt-get or dpkg non-interactively; fail the test with its output when it fails."""
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def apt_get(*args: str) -> str:
    """apt-get, offline all the same: the guest has no network and every dependency installed.
    (Not --no-download: apt then refuses a local .deb, "Pathname to install is not absolute".)"""
    return packaging("apt-get", "-y", "-q", *args)


def dpkg(*args: str) -> str:
    """dpkg itself, for the steps where apt would only add its look-up of the package lists (some
    seconds under TCG): the maintainer scripts run the same."""
    return packaging("dpkg", *args)


def unit_property(name: str) -> str:
    return subprocess.run(
        ["systemctl", "show", "-P", name, "vfiocapsd.service"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip


def ctl_status() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["vfiocapsctl", "--timeout", "120", "status"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def activatable() -> list[str]:
    return list(
        busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
               "ListActivatableNames")[0]
    )  # fmt: skip


def package_files() -> list[Path]:
    listed = subprocess.run(
        ["dpkg-query", "-L", PACKAGE], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split("\n")
    return [Path(line) for line in listed if line and Path(line).is_file()]


def leftovers() -> list[str]:
    """Paths named after the package under SEARCHED, skipping the lab's own (its shares too)
    and systemd's bookkeeping of units under /run/systemd, which is systemd's, not ours."""
    found = []
    for top in SEARCHED:
        for where, dirs, names in os.walk(top):
            dirs[:] = [
                name
                for name in dirs
                if "vfiocaps-lab" not in name and f"{where}/{name}" != "/run/systemd"
            ]
            found += [
                f"{where}/{name}"
                for name in dirs + names
                if "vfiocaps" in name and "vfiocaps-lab" not in name
            ]
    return sorted(found)


def test_package_cycle(daemon: Daemon) -> None:
    package = deb()
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status} ${Version}", PACKAGE],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    assert installed.startswith("install ok installed"), installed
    subprocess.run(["getent", "passwd", "vfiocaps-probe"], check=True, timeout=60)
    files = package_files()
    assert Path("/usr/share/dbus-1/interfaces/org.vfiocaps1.xml") in files
    assert unit_property("LoadState") == "loaded"

    # Installed by the package and started by systemd: it answers on the system bus.
    daemon.systemctl("start")
    wait_for(daemon.is_serving, 120, "vfiocapsd to serve")
    status = ctl_status()
    assert status.returncode == 0, status.stderr
    before = unit_property("MainPID")

    # Upgrade (the same version rebuilt): the running daemon is restarted on the new files.
    dpkg("--install", str(package))
    wait_for(lambda: unit_property("MainPID") not in ("0", before), 120, "the restart")
    wait_for(daemon.is_serving, 120, "vfiocapsd to serve after the upgrade")
    assert ctl_status().returncode == 0
    assert CACHE.is_dir()

    # Remove: the service stops and cannot be activated, the cache stays.
    dpkg("--remove", PACKAGE)
    assert unit_property("ActiveState") in ("inactive", "failed")
    assert not daemon.is_serving()
    assert unit_property("LoadState") == "not-found"
    assert BUS_NAME not in activatable()
    assert not Path("/usr/bin/vfiocapsd").exists()
    assert not Path("/usr/share/vfiocaps").exists()
    assert CACHE.is_dir(), "removal must keep the cache"

    # Purge: cache, runtime directory and every file of the package are gone.
    dpkg("--purge", PACKAGE)
    assert not CACHE.exists()
    assert not RUNTIME.exists()
    assert not [str(path) for path in files if path.exists()]
    assert leftovers() == []

    # Installed again, the daemon is started by bus activation alone and answers.
    apt_get("install", str(package))
    assert unit_property("ActiveState") == "inactive"
    assert BUS_NAME in activatable()
    status = ctl_status()
    assert status.returncode == 0, f"{status.stderr}\n{daemon.journal()}"
    assert unit_property("ActiveState") == "active"
