"""Lent device nodes between real root processes: vfiocapsctl probe and vfiocapsd sharing one
grant journal, nodes replaced or linked while lent, ACLs added by the probe user, crashes."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.harness import wait_until
from support.prober import (
    FakeHost,
    fake_host,
    install_fake_qemu,
    make_group_node,
    make_readable,
    node_state,
    probe_user,
    scratch,
)

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lending device nodes needs root")

FIRST = "33333333-4444-4555-8666-000000000001"
SECOND = "33333333-4444-4555-8666-000000000002"
ACL_XATTR = "system.posix_acl_access"


def pausing(uuid: str, seconds: float) -> dict[str, Any]:
    """Fake QEMU overrides: hold the probe of *uuid* for *seconds* (node lent meanwhile)."""
    fault = {"on": "query-migrate", "pause_seconds": seconds}
    return {"devices": {uuid: {"fault": fault}}}


@dataclass
class Rig:
    scratch: Path
    host: FakeHost
    user: str

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    @property
    def gid(self) -> int:
        """The probe user's own group: systemd-sysusers often gives it the user's number, never
        assume either way."""
        return pwd.getpwnam(self.user).pw_gid

    @property
    def runtime(self) -> Path:
        return self.scratch / "run"

    def node(self, group: str) -> Path:
        return self.host.dev / "vfio" / group

    def qemu(self, name: str, overrides: dict[str, Any] | None = None) -> Path:
        binary = install_fake_qemu(self.scratch / name, overrides)
        make_readable(self.scratch)
        return binary

    def ctl(self, device: str, qemu: Path) -> subprocess.Popen[str]:
        """``vfiocapsctl probe`` as a real root process sharing this rig's runtime directory."""
        return subprocess.Popen(
            [
                sys.executable, "-m", "vfiocaps.ctl", "probe", device, "--json",
                "--sysfs-root", str(self.host.sysfs), "--dev-root", str(self.host.dev),
                "--runtime-dir", str(self.runtime), "--qemu", str(qemu),
                "--probe-user", self.user,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def wait_lent(self, group: str) -> None:
        wait_until(lambda: node_state(self.node(group))[0] == self.uid, 20, f"group {group} lent")

    def records(self) -> list[Path]:
        journal = self.runtime / "grants"
        return sorted(journal.glob("*.json")) if journal.exists() else []


@pytest.fixture
def rig(scratch: Path, fake_host: FakeHost, probe_user: str) -> Iterator[Rig]:
    fake_host.add_mdev(FIRST, "mdpy-vga", "mdpy", "7", parent="mdpy")
    fake_host.add_mdev(SECOND, "mtty-1", "mtty", "8")
    yield Rig(scratch, fake_host, probe_user)
    for pid in processes_running(scratch):
        os.kill(pid, signal.SIGKILL)


def processes_running(directory: Path) -> list[int]:
    """Processes whose command line names a file under *directory* (a fake QEMU)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if name.isdigit() and any(arg.startswith(os.fsencode(directory)) for arg in argv[:2]):
            found.append(int(name))
    return found


def kill_with_its_qemu(process: subprocess.Popen[str], qemu_dir: Path) -> None:
    """SIGKILL a probing process and then the QEMU it left behind (it runs in its own group)."""
    process.kill()
    process.wait(10)
    for pid in processes_running(qemu_dir):
        os.kill(pid, signal.SIGKILL)


def replace_node(node: Path) -> None:
    """A new node in place of *node*, as when its device goes and a new one gets its number.

    devtmpfs gives every node it creates a new inode number; a disk file system may hand the
    freed one out again at once, so the old inode is kept (linked aside) while the new is made.
    """
    aside = node.with_name(f".{node.name}.gone")
    os.link(node, aside)
    node.unlink()
    make_group_node(node)


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, err


def test_a_second_process_recovering_leaves_a_live_grant_alone(rig: Rig) -> None:
    holder = rig.ctl(FIRST, rig.qemu("slow", pausing(FIRST, 4)))
    rig.wait_lent("7")
    other = rig.ctl(SECOND, rig.qemu("quick"))
    assert finish(other)[0] == 0
    assert holder.poll() is None, "the first probe should still be running"
    assert node_state(rig.node("7"))[0] == rig.uid  # still lent to the running probe
    assert finish(holder)[0] == 0
    assert node_state(rig.node("7")) == (0, 0, 0o600)
    assert rig.records() == []


def test_a_node_lent_by_another_process_is_busy_and_ends_restored(rig: Rig) -> None:
    first = rig.ctl(FIRST, rig.qemu("first", pausing(FIRST, 2)))
    rig.wait_lent("7")
    second = rig.ctl(FIRST, rig.qemu("second", pausing(FIRST, 5)))
    status, err = finish(second)
    assert finish(first)[0] == 0
    assert status == 4, err  # busy: lent to the probe user by a live process
    assert node_state(rig.node("7")) == (0, 0, 0o600)
    assert rig.records() == []


def test_a_replaced_node_is_not_given_the_old_owner(rig: Rig) -> None:
    node = rig.node("7")
    os.chown(node, 0, 6)  # the old node: an unusual group and mode
    node.chmod(0o640)
    holder = rig.ctl(FIRST, rig.qemu("slow", pausing(FIRST, 3)))
    rig.wait_lent("7")
    replace_node(node)  # the device goes, a new device gets the same group number
    finish(holder)
    assert node_state(node) == (0, 0, 0o600)


def test_a_replaced_node_is_not_touched_by_recovery_after_a_crash(rig: Rig) -> None:
    node = rig.node("7")
    os.chown(node, 0, 6)
    node.chmod(0o640)
    holder = rig.ctl(FIRST, rig.qemu("slow", pausing(FIRST, 30)))
    rig.wait_lent("7")
    kill_with_its_qemu(holder, rig.scratch / "slow")  # it dies with the node lent
    replace_node(node)
    os.chown(node, rig.uid, -1)  # even a new node that the probe user happens to own
    recovering = rig.ctl(SECOND, rig.qemu("quick"))
    assert finish(recovering)[0] == 0
    assert node_state(node) == (0, 0, 0o600)  # reset as leaked, not given gid 6 and 0640
    assert rig.records() == []


def test_a_crashed_probe_is_recovered_by_the_next_process(rig: Rig) -> None:
    node = rig.node("7")
    os.chown(node, 0, 6)
    node.chmod(0o640)
    holder = rig.ctl(FIRST, rig.qemu("slow", pausing(FIRST, 30)))
    rig.wait_lent("7")
    kill_with_its_qemu(holder, rig.scratch / "slow")
    assert rig.records() != []
    recovering = rig.ctl(SECOND, rig.qemu("quick"))
    assert finish(recovering)[0] == 0
    assert node_state(node) == (0, 6, 0o640)
    assert rig.records() == []


def test_a_linked_group_node_is_never_followed(rig: Rig) -> None:
    qemu = rig.qemu("quick")
    victim = rig.scratch / "victim"
    victim.write_text("root's secret")
    victim.chmod(0o600)
    node = rig.node("7")
    node.unlink()
    node.symlink_to(victim)
    status, err = finish(rig.ctl(FIRST, qemu))
    assert status == 1, err
    assert node_state(victim) == (0, 0, 0o600)


def _acl_for(uid: int) -> bytes:
    """A POSIX ACL in the kernel's xattr format: owner rw, user *uid* rw, group -, other -."""
    everyone = 0xFFFFFFFF
    entries = [(0x01, 6, everyone), (0x02, 6, uid), (0x04, 0, everyone), (0x10, 6, everyone)]
    entries.append((0x20, 0, everyone))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def test_an_acl_added_by_the_probe_user_goes_with_the_grant(rig: Rig) -> None:
    node = rig.node("7")
    holder = rig.ctl(FIRST, rig.qemu("slow", pausing(FIRST, 3)))
    rig.wait_lent("7")
    script = f"import os; os.setxattr({str(node)!r}, {ACL_XATTR!r}, {_acl_for(65534)!r})"
    subprocess.run(
        ["setpriv", f"--reuid={rig.uid}", f"--regid={rig.gid}", "--clear-groups",
         sys.executable, "-c", script],
        check=True, timeout=30,
    )  # fmt: skip
    assert ACL_XATTR in os.listxattr(node)  # the owner could add it
    assert finish(holder)[0] == 0
    assert ACL_XATTR not in os.listxattr(node)
    assert node_state(node) == (0, 0, 0o600)


def test_a_node_the_probe_user_owns_without_a_record_is_reset(rig: Rig) -> None:
    node = rig.node("7")
    os.chown(node, rig.uid, -1)  # leaked by an earlier crash whose record is gone
    node.chmod(0o666)
    kvm = rig.host.dev / "kvm"
    os.mknod(kvm, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # Owned by the probe user, not by its group: a probe user whose group owns a device node is
    # refused outright (that is another test), and this one is about the leaked owner.
    os.chown(kvm, rig.uid, 0)
    status, err = finish(rig.ctl(FIRST, rig.qemu("quick")))
    assert status == 0, err
    assert node_state(node) == (0, 0, 0o600)
    try:
        expected = (0, grp.getgrnam("kvm").gr_gid, 0o660)
    except KeyError:
        expected = (0, 0, 0o600)
    assert node_state(kvm) == expected
