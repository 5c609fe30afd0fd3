"""Who the probe QEMU runs as and what it inherits: a missing probe user (said plainly, picked up
once created), probe users with groups of value (refused), vfiocapsctl probe's no_new_privs, and
an environment that comes from configuration only."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.daemon_lab import Lab
from support.harness import wait_until
from support.prober import (
    SYSUSERS,
    FakeHost,
    fake_host,
    install_fake_qemu,
    make_readable,
    probe_user,
    scratch,
)
from vfiocaps.prober.sandbox import ProbeIdentity, kvm_access
from vfiocaps.process import Credentials

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

DEVICE = "55555555-6666-4777-8888-000000000001"
MISSING = "vfiocaps-test-later"
GROUPED = "vfiocaps-test-grouped"
DEVICE_GROUP = "vfiocaps-test-devices"


def add_user(name: str, *groups: str) -> None:
    command = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir"]
    command += ["/nonexistent", "--shell", "/usr/sbin/nologin"]
    if groups:
        command += ["--groups", ",".join(groups)]
    subprocess.run([*command, name], check=True, capture_output=True)


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def users() -> Iterator[None]:
    for name in (MISSING, GROUPED):
        remove_user(name)
    subprocess.run(["groupdel", DEVICE_GROUP], check=False, capture_output=True)
    try:
        yield
    finally:
        for name in (MISSING, GROUPED):
            remove_user(name)
        subprocess.run(["groupdel", DEVICE_GROUP], check=False, capture_output=True)


@pytest.mark.skipif(shutil.which("umockdev-wrapper") is None, reason="umockdev is missing")
def test_a_missing_probe_user_is_named_with_the_fix_and_picked_up_once_created(
    lab: Lab, users: None
) -> None:
    lab.host.build("mtty")
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.start("--probe-user", MISSING, "--probe-retry-seconds", "1")
    wait_until(lambda: lab.states().get(uuid) == "failed", 20, "the device to fail")
    error = lab.devices()[uuid]["LastError"]
    assert f"probe user '{MISSING}' does not exist" in error
    assert "systemd-sysusers" in error
    assert 'u vfiocaps-probe - "vfiocaps device probes"' in error
    add_user(MISSING)
    lab.wait_states({uuid: "done"}, timeout=30)


def run_ctl(
    scratch: Path, host: FakeHost, user: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    qemu = install_fake_qemu(
        scratch / "qemu",
        {"devices": {DEVICE: {"fault": {"on": "query-migrate", "pause_seconds": 3}}}},
    )
    make_readable(scratch)
    return subprocess.Popen(
        [
            sys.executable, "-m", "vfiocaps.ctl", "probe", DEVICE, "--json",
            "--sysfs-root", str(host.sysfs), "--dev-root", str(host.dev),
            "--runtime-dir", str(scratch / "run"), "--qemu", str(qemu), "--probe-user", user,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def qemu_process(scratch: Path) -> int:
    found: list[int] = []

    def running() -> bool:
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = any(arg.startswith(os.fsencode(scratch / "qemu")) for arg in argv[:2])
            if ours and b"-chardev" in argv:  # a probe launch, not the -version question
                found.append(int(name))
                return True
        return False

    wait_until(running, 20, "the probe QEMU")
    return found[0]


def probe_qemu_sees(
    scratch: Path, host: FakeHost, user: str, *args: str, env: dict[str, str]
) -> tuple[str, list[bytes]]:
    """The probe QEMU's /proc status and environment, under ``vfiocapsctl probe *args``."""
    host.add_mdev(DEVICE, "mdpy-vga", "mdpy", "4", parent="mdpy")
    ctl = run_ctl(scratch, host, user, *args, env=env)
    pid = qemu_process(scratch)
    status = Path(f"/proc/{pid}/status").read_text()
    environ = sorted(filter(None, Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")))
    _, err = ctl.communicate(timeout=60)
    assert ctl.returncode == 0, err
    return status, environ


PATH = b"PATH=" + os.fsencode("/usr/sbin:/usr/bin:/sbin:/bin")


def test_vfiocapsctl_probe_runs_qemu_without_new_privileges_or_its_environment(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    sniffed = {"UMOCKDEV_DIR": "/nonexistent", "LD_PRELOAD": ""}
    status, environ = probe_qemu_sees(scratch, fake_host, probe_user, env=sniffed)
    assert "NoNewPrivs:\t1" in status
    assert environ == [b"LC_ALL=C", PATH]


def test_the_probe_environment_is_configured(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    given = ("--probe-env", "GIVEN=yes", "--probe-env", "UMOCKDEV_DIR")
    _, environ = probe_qemu_sees(
        scratch, fake_host, probe_user, *given, env={"UMOCKDEV_DIR": "/nonexistent"}
    )
    assert environ == [b"GIVEN=yes", b"LC_ALL=C", PATH, b"UMOCKDEV_DIR=/nonexistent"]


def test_probe_users_in_well_known_device_groups_are_refused_without_their_nodes_in_sight(
    scratch: Path, fake_host: FakeHost, users: None
) -> None:
    """The daemon's /dev (a private one under the unit) holds no video or dialout node, but the
    probe user's groups reach the host's: they are refused by name."""
    fake_host.add_mdev(DEVICE, "mdpy-vga", "mdpy", "4", parent="mdpy")
    for group in ("video", "dialout"):
        assert not any(
            os.lstat(node).st_gid == grp.getgrnam(group).gr_gid for node in fake_host.dev.rglob("*")
        )
        remove_user(GROUPED)
        add_user(GROUPED, group)
        ctl = run_ctl(scratch, fake_host, GROUPED)
        out, err = ctl.communicate(timeout=60)
        assert ctl.returncode == 1, (group, out, err)
        assert f"'{GROUPED}' is in group(s) {group}, which own devices" in out, out
        assert '"Launches": []' in out


def test_probe_users_in_groups_of_value_are_refused(
    scratch: Path, fake_host: FakeHost, users: None
) -> None:
    fake_host.add_mdev(DEVICE, "mdpy-vga", "mdpy", "4", parent="mdpy")
    subprocess.run(["groupadd", "--system", DEVICE_GROUP], check=True, capture_output=True)
    node = fake_host.dev / "tape0"
    os.mknod(node, stat.S_IFCHR | 0o660, os.makedev(1, 3))
    shutil.chown(node, "root", DEVICE_GROUP)
    for group in ("disk", DEVICE_GROUP):
        remove_user(GROUPED)
        add_user(GROUPED, group)
        ctl = run_ctl(scratch, fake_host, GROUPED)
        out, err = ctl.communicate(timeout=60)
        assert ctl.returncode == 1, (group, out, err)
        assert f"'{GROUPED}' is in group(s) {group}, which own devices" in out, out
        assert '"Launches": []' in out


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is missing")
def test_the_tests_probe_user_is_the_one_the_package_makes(probe_user: str, tmp_path: Path) -> None:
    """The suite runs with the probe user people have: made by systemd-sysusers from the
    project's sysusers file (as scripts/run-daemon and the package make it), whose group is
    often numbered as the user. A user made otherwise (an older useradd) is named with the fix."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(SYSUSERS)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    lines = (root / "etc/passwd").read_text().splitlines()
    made = {line.split(":")[0]: line.split(":") for line in lines}
    _, _, _, _, gecos, home, shell = made[probe_user]
    entry = pwd.getpwnam(probe_user)
    fix = f"{probe_user} is not as systemd-sysusers makes it: userdel {probe_user}; tests remake it"
    assert (entry.pw_gecos, entry.pw_dir, entry.pw_shell) == (gecos, home, shell), fix
    assert grp.getgrgid(entry.pw_gid).gr_name == probe_user, fix


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm")
def test_kvm_is_reached_through_its_group_only_when_the_group_policy_allows_it(
    tmp_path: Path,
) -> None:
    """A /dev/kvm left root:disk 0660 does not give QEMU the disk group (the node is lent to the
    probe user instead); root:kvm 0660 gives the kvm group, unless kvm owns other nodes too."""
    identity = ProbeIdentity(Credentials(4242, 4242, (4242,)), "u")
    kvm = tmp_path / "kvm"
    real = os.stat("/dev/kvm").st_rdev
    os.mknod(kvm, stat.S_IFCHR | 0o660, real)
    kvm.chmod(0o660)  # mknod's mode passes through the umask
    for group, expected in (("disk", (None, True)), ("kvm", (grp.getgrnam("kvm").gr_gid, False))):
        os.chown(kvm, 0, grp.getgrnam(group).gr_gid)
        access = kvm_access(tmp_path, identity)
        assert access.usable, access.reason
        assert (access.group, access.needs_grant) == expected, group
    other = tmp_path / "sdz"
    os.mknod(other, stat.S_IFBLK | 0o660, os.makedev(7, 0))
    other.chmod(0o660)
    os.chown(other, 0, grp.getgrnam("kvm").gr_gid)
    access = kvm_access(tmp_path, identity)
    assert (access.group, access.needs_grant) == (None, True)
