"""The probe sandbox's host side: who QEMU runs as, which device nodes it may open, scratch space.

QEMU never runs as root. When vfiocapsd is root it runs QEMU as ``Config.probe_user``: the child
calls setgroups/setgid/setuid before ``exec`` (QEMU's own ``-run-with user=`` cannot be combined
with ``-sandbox ...,elevateprivileges=deny``: QEMU is then killed by SIGSYS). That user needs

* read-write access to the IOMMU group node ``/dev/vfio/N`` (root, 0600): lent for the probe's
  duration by making the user its owner, and given back after (:mod:`.grants`);
* ``/dev/vfio/vfio`` (0666 by default) and read access to sysfs: nothing to grant;
* ``/dev/kvm`` for ``accel=kvm``: through its group, given to the QEMU process only, when the
  node is group read-write (Debian: ``root:kvm 0660``), else lent like a group node.

The probe user must hold nothing of value by itself: it is refused when it is root, or when its
primary or any supplementary group is root's, one of :data:`PRIVILEGED_GROUPS`, one of the
well-known device groups :data:`DEVICE_GROUPS`, or a group that owns a device node under the
device root (``kvm`` included: the probe gets that group per QEMU process, a standing membership
would hand ``/dev/kvm`` to anything else running as the user). Device groups are refused by name
as well because the device root vfiocapsd sees may not be the host's (its unit gives it a private
``/dev`` holding only what it needs), while the probe user's groups reach every device of the host.
A group QEMU is given for one launch (a render node's) passes the same policy but for its own
nodes (:func:`launch_group_refusal`).

When vfiocapsd is not root, QEMU runs as vfiocapsd's own user and nothing is granted.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProbeBusyError, ProbeError
from ..hostpaths import DEV_ROOT
from ..process import Credentials
from ..vfiogroup import held_elsewhere

log = logging.getLogger("vfiocaps.prober")

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
SYSUSERS_LINE = 'u vfiocaps-probe - "vfiocaps device probes" - -'
# Groups that give access to files of value (logs, disks, memory, shadow passwords, containers,
# other machines) on common distributions, whether or not a node of theirs is in sight.
PRIVILEGED_GROUPS = frozenset(
    {
        "root", "wheel", "sudo", "admin", "adm", "staff", "shadow", "disk", "kmem", "tty",
        "systemd-journal", "docker", "lxd", "incus-admin", "libvirt", "libvirt-qemu", "kvm",
    }
)  # fmt: skip
# Groups udev rules and distributions give device nodes (systemd's 50-udev-default.rules,
# Debian, Fedora, Arch): a member reaches those devices wherever they appear.
DEVICE_GROUPS = frozenset(
    {
        "audio", "bluetooth", "cdrom", "dialout", "disk", "floppy", "gpio", "i2c", "input",
        "kmem", "kvm", "lock", "lp", "netdev", "plugdev", "render", "scanner", "sgx", "spi",
        "tape", "tty", "usb", "uucp", "video",
    }
)  # fmt: skip
# The group udev gives /dev/kvm (systemd's 50-udev-default.rules).
KVM_GROUPS = frozenset({"kvm"})
DEV_SCAN_DEPTH = 3
DEV_SCAN_LIMIT = 20000


class ProbeSandboxError(ProbeError):
    """The sandbox cannot be set up: no probe user, a privileged probe user, or no device node."""


@dataclass(frozen=True)
class ProbeIdentity:
    """Who QEMU runs as, and why."""

    credentials: Credentials | None  # None: as vfiocapsd's own (unprivileged) user
    description: str

    @property
    def uid(self) -> int:
        """The uid QEMU runs with."""
        return self.credentials.uid if self.credentials else os.geteuid()

    def with_groups(self, *groups: int) -> ProbeIdentity:
        """The same identity with extra supplementary groups (only when switching users)."""
        if self.credentials is None or not groups:
            return self
        creds = self.credentials
        merged = tuple(dict.fromkeys((*creds.groups, *groups)))
        return ProbeIdentity(Credentials(creds.uid, creds.gid, merged), self.description)


def device_groups(dev_root: Path) -> set[int]:
    """The groups owning a device node under *dev_root* (links not followed). Raises nothing."""
    return set(device_nodes_by_group(dev_root))


# The device nodes under a device root by owning group: one scan, shared by the checks of a probe.
DeviceNodes = dict[int, list[Path]]


def device_nodes_by_group(dev_root: Path) -> DeviceNodes:
    """The device nodes under *dev_root* (links not followed) by owning group. Raises nothing."""
    found: DeviceNodes = {}
    seen = 0
    pending = [(dev_root, 0)]
    while pending and seen < DEV_SCAN_LIMIT:
        directory, depth = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                found.setdefault(st.st_gid, []).append(Path(entry.path))
            elif stat.S_ISDIR(st.st_mode) and depth < DEV_SCAN_DEPTH:
                pending.append((Path(entry.path), depth + 1))
    return found


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_REFUSED_NAMES = PRIVILEGED_GROUPS | DEVICE_GROUPS


def launch_group_refusal(
    gid: int,
    dev_root: Path,
    own: frozenset[str],
    nodes: set[Path],
    scanned: DeviceNodes | None = None,
) -> str:
    """Why the group *gid* may not be given to QEMU for one launch to reach *nodes* (``""``:
    it may). Refused: root's group, a group of :data:`PRIVILEGED_GROUPS` or :data:`DEVICE_GROUPS`
    other than *own* (the names expected for such nodes: ``kvm`` for /dev/kvm, ``render`` for
    render nodes), and a group that owns any other device node under *dev_root* (*scanned*: the
    probe's scan of *dev_root*, else it is scanned now). Raises nothing."""
    name = _group_name(gid)
    if gid == 0:
        return "its group is root's"
    if name not in own and (name in PRIVILEGED_GROUPS or name in DEVICE_GROUPS):
        return f"its group {name} gives access to devices or files of value"
    if scanned is None:
        scanned = device_nodes_by_group(dev_root)
    others = [node for node in scanned.get(gid, []) if node not in nodes]
    if others:
        return f"its group {name} also owns {others[0]}"
    return ""


def resolve_probe_identity(
    probe_user: str, dev_root: Path = DEV_ROOT, scanned: DeviceNodes | None = None
) -> ProbeIdentity:
    """The identity QEMU runs with: *probe_user* when we are root, else our own user. The groups
    owning device nodes come from *scanned* (the probe's scan of *dev_root*), else a scan now.

    Raises :class:`ProbeSandboxError` when we are root and *probe_user* does not exist, is
    root, or is in a privileged group (see the module's docstring).
    """
    if os.geteuid() != 0:
        uid = os.geteuid()
        return ProbeIdentity(
            None, f"vfiocapsd is not root: QEMU runs as vfiocapsd's own user (uid {uid})"
        )
    try:
        entry = pwd.getpwnam(probe_user)
    except KeyError:
        raise ProbeSandboxError(
            f"probe user {probe_user!r} does not exist, and QEMU never runs as root: create it "
            f"with systemd-sysusers (the package's sysusers.d line is: {SYSUSERS_LINE}), or name "
            f"another unprivileged user with --probe-user; probes resume by themselves"
        ) from None
    if entry.pw_uid == 0:
        raise ProbeSandboxError(f"probe user {probe_user!r} is root; QEMU never runs as root")
    groups = set(os.getgrouplist(probe_user, entry.pw_gid))
    refused = {gid for gid in groups if gid == 0 or _group_name(gid) in _REFUSED_NAMES}
    refused |= groups & (set(scanned) if scanned is not None else device_groups(dev_root))
    if refused:
        names = ", ".join(sorted(_group_name(gid) for gid in refused))
        raise ProbeSandboxError(
            f"probe user {probe_user!r} is in group(s) {names}, which own devices or files of "
            f"value; QEMU runs only as a user without them: remove the user from them, or name "
            f"another user with --probe-user"
        )
    return ProbeIdentity(
        Credentials(entry.pw_uid, entry.pw_gid, (entry.pw_gid,)),
        f"QEMU runs as {probe_user} (uid {entry.pw_uid})",
    )


def check_group_not_busy(node: Path) -> None:
    """Fail when the VFIO group *node* is open elsewhere, without disturbing the holder.

    Raises :class:`ProbeBusyError` for a held group, :class:`ProbeSandboxError` when the node
    is missing or cannot be opened.
    """
    try:
        held = held_elsewhere(node)
    except OSError as err:
        raise ProbeSandboxError(f"cannot open {node}: {err.strerror}") from err
    if held:
        raise ProbeBusyError(f"{node} is open elsewhere (a running VM?)")


@dataclass(frozen=True)
class KvmAccess:
    """Whether accel=kvm is possible and how the QEMU user reaches ``/dev/kvm``."""

    usable: bool
    node: Path
    group: int | None = None  # give QEMU this supplementary group
    needs_grant: bool = False  # else make the probe user the node's owner for the probe
    reason: str = ""


def kvm_access(
    dev_root: Path, identity: ProbeIdentity, scanned: DeviceNodes | None = None
) -> KvmAccess:
    """Decide whether a probe can use KVM (*scanned*: see :func:`launch_group_refusal`). Raises
    nothing; the answer says why not."""
    node = dev_root / "kvm"
    try:
        st = os.stat(node)
    except OSError as err:
        return KvmAccess(False, node, reason=f"{node}: {err.strerror}")
    if not stat.S_ISCHR(st.st_mode):
        return KvmAccess(False, node, reason=f"{node} is not a character device")
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return KvmAccess(False, node, reason=f"{node}: {err.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return KvmAccess(False, node, reason=f"{node}: KVM_GET_API_VERSION: {err.strerror}")
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return KvmAccess(False, node, reason=f"{node}: unexpected KVM API version {version}")
    if identity.credentials is None:
        return KvmAccess(True, node)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == identity.uid or mode & 0o006 == 0o006:
        return KvmAccess(True, node)
    # Through its group only when the probe user's policy allows that group for a launch (a
    # node left root:disk must not give QEMU the disk group); else the node is lent.
    if mode & 0o060 == 0o060 and not launch_group_refusal(
        st.st_gid, dev_root, KVM_GROUPS, {node}, scanned
    ):
        return KvmAccess(True, node, group=st.st_gid)
    return KvmAccess(True, node, needs_grant=True)


PROBE_DIRECTORY_PREFIX = "probe-"


@contextlib.contextmanager
def private_directory(runtime_dir: Path) -> Iterator[Path]:
    """A fresh 0700 directory under *runtime_dir* for one probe, removed with all its content.

    The directory is ``flock``-ed while it is in use, and appears under its ``probe-`` name only
    once locked, so that :func:`remove_stale_probe_directories` can tell the directories of
    killed processes from live ones. Raises :class:`ProbeSandboxError` when it cannot be created.
    """
    try:
        runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        making = Path(tempfile.mkdtemp(prefix=".new-" + PROBE_DIRECTORY_PREFIX, dir=runtime_dir))
        lock = os.open(making, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise ProbeSandboxError(f"cannot create a probe directory in {runtime_dir}: {err}") from err
    path = runtime_dir / making.name.removeprefix(".new-")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.rename(making, path)
    except OSError as err:
        os.close(lock)
        shutil.rmtree(making, ignore_errors=True)
        raise ProbeSandboxError(f"cannot create a probe directory in {runtime_dir}: {err}") from err
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(lock)
        if path.exists():
            log.error("could not remove probe directory %s", path)


def remove_stale_probe_directories(runtime_dir: Path) -> list[Path]:
    """Remove the probe directories of processes that are gone (their lock is free); return
    them. Raises nothing."""
    removed = []
    for path in sorted(runtime_dir.glob(PROBE_DIRECTORY_PREFIX + "*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live probe's
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
