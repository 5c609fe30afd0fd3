"""The probe sandbox's host side: who QEMU runs as, which device nodes it may open, scratch space.

QEMU never runs as root. When vfiocapsd is root it runs QEMU as ``Config.probe_user``: the child
calls setgroups/setgid/setuid before ``exec`` (QEMU's own ``-run-with user=`` cannot be combined
with ``-sandbox ...,elevateprivileges=deny``: QEMU is then killed by SIGSYS). That user needs

* read-write access to the IOMMU group node ``/dev/vfio/N`` (root, 0600): granted for the
  probe's duration by making the user its owner, and restored to the exact owner and mode after;
* ``/dev/vfio/vfio`` (0666 by default) and read access to sysfs: nothing to grant;
* ``/dev/kvm`` for ``accel=kvm``: through its group when the node is group read-write (Debian:
  ``root:kvm 0660``), else granted like a group node.

When vfiocapsd is not root, QEMU runs as vfiocapsd's own user and nothing is granted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProbeBusyError, ProbeError
from ..process import Credentials

log = logging.getLogger("vfiocaps.prober")

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


class ProbeSandboxError(ProbeError):
    """The sandbox cannot be set up: no probe user, a root probe user, or no device node."""


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


def resolve_probe_identity(probe_user: str) -> ProbeIdentity:
    """The identity QEMU runs with: *probe_user* when we are root, else our own user.

    Raises :class:`ProbeSandboxError` when we are root and *probe_user* does not exist or is
    root itself.
    """
    if os.geteuid() != 0:
        uid = os.geteuid()
        return ProbeIdentity(
            None, f"vfiocapsd is not root: QEMU runs as vfiocapsd's own user (uid {uid})"
        )
    try:
        entry = pwd.getpwnam(probe_user)
    except KeyError:
        raise ProbeSandboxError(f"probe user {probe_user!r} does not exist") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ProbeSandboxError(f"probe user {probe_user!r} is root; QEMU never runs as root")
    return ProbeIdentity(
        Credentials(entry.pw_uid, entry.pw_gid, (entry.pw_gid,)),
        f"QEMU runs as {probe_user} (uid {entry.pw_uid})",
    )


@dataclass(frozen=True)
class NodeState:
    """Owner and permission bits of a device node, to be restored exactly."""

    uid: int
    gid: int
    mode: int


@dataclass
class _Grant:
    original: NodeState
    holders: int = 0


@dataclass
class NodeGrants:
    """Temporary ownership of device nodes, shared by concurrent probes (reference counted).

    The first grant of a node records its owner and mode and makes the probe user its owner;
    the last release restores both exactly. Only used when vfiocapsd is root. With a *journal*
    directory each active grant is also written there before the node changes, so that
    :meth:`recover` can restore nodes a killed vfiocapsd left granted.
    """

    journal: Path | None = None
    _grants: dict[Path, _Grant] = field(default_factory=dict)

    @contextlib.contextmanager
    def granted(self, node: Path, uid: int) -> Iterator[None]:
        """Give *uid* read-write access to *node* for the duration of the ``with`` block.

        Raises :class:`ProbeSandboxError` when the node is missing or cannot be changed.
        """
        self._acquire(node, uid)
        try:
            yield
        finally:
            self._release(node)

    def _record(self, node: Path) -> Path | None:
        if self.journal is None:
            return None
        name = hashlib.sha256(os.fsencode(node)).hexdigest()[:32]
        return self.journal / f"{name}.json"

    def _acquire(self, node: Path, uid: int) -> None:
        grant = self._grants.get(node)
        if grant is None:
            original: NodeState | None = None
            try:
                st = os.stat(node)
                original = NodeState(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
                self._write_record(node, original)
                os.chown(node, uid, -1)
                if original.mode & 0o600 != 0o600:
                    os.chmod(node, original.mode | 0o600)
            except OSError as err:
                self._restore(node, original)
                raise ProbeSandboxError(f"cannot grant {node} to uid {uid}: {err}") from err
            grant = self._grants[node] = _Grant(original)
        grant.holders += 1

    def _write_record(self, node: Path, original: NodeState) -> None:
        record = self._record(node)
        if record is None:
            return
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = record.with_suffix(".tmp")
        temporary.write_text(
            json.dumps(
                {"node": str(node), "uid": original.uid, "gid": original.gid, "mode": original.mode}
            )
        )
        os.replace(temporary, record)

    def _release(self, node: Path) -> None:
        grant = self._grants[node]
        grant.holders -= 1
        if grant.holders > 0:
            return
        del self._grants[node]
        self._restore(node, grant.original)

    def _restore(self, node: Path, original: NodeState | None) -> None:
        try:
            if original is not None:
                os.chown(node, original.uid, original.gid)
                os.chmod(node, original.mode)
        except FileNotFoundError:
            pass  # the device went away with its node
        except OSError as err:
            log.error("cannot restore owner and mode of %s: %s", node, err)
            return
        record = self._record(node)
        if record is not None:
            with contextlib.suppress(FileNotFoundError):
                record.unlink()
            with contextlib.suppress(OSError):
                record.parent.rmdir()  # only when no other grant is recorded

    def recover(self) -> list[Path]:
        """Restore nodes recorded in the journal by an earlier process; return them.

        Raises nothing: unreadable records are logged and removed.
        """
        if self.journal is None or not self.journal.is_dir():
            return []
        restored = []
        for record in sorted(self.journal.glob("*.json")):
            try:
                values = json.loads(record.read_text())
                node = Path(values["node"])
                original = NodeState(int(values["uid"]), int(values["gid"]), int(values["mode"]))
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.error("discarding unreadable grant record %s: %s", record, err)
                with contextlib.suppress(FileNotFoundError):
                    record.unlink()
                continue
            if node in self._grants:
                continue
            log.warning("restoring %s, left granted by an earlier vfiocapsd", node)
            self._restore(node, original)
            restored.append(node)
        return restored

    def active(self) -> dict[Path, NodeState]:
        """Nodes currently granted, with the state they will be restored to."""
        return {node: grant.original for node, grant in self._grants.items()}


def group_node(dev_root: Path, iommu_group: str) -> Path:
    """The VFIO group node of *iommu_group* under *dev_root*."""
    return dev_root / "vfio" / iommu_group


def check_group_not_busy(node: Path) -> None:
    """Fail when the VFIO group *node* is open elsewhere, without disturbing the holder.

    A VFIO group can be open only once: a second open fails with EBUSY and has no effect on
    the holder. When nobody holds it our open succeeds and is closed at once, untouched.
    Raises :class:`ProbeBusyError` for a held group, :class:`ProbeSandboxError` when the node
    is missing or cannot be opened.
    """
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise ProbeBusyError(f"{node} is open elsewhere (a running VM?)") from err
        raise ProbeSandboxError(f"cannot open {node}: {err.strerror}") from err
    os.close(fd)


@dataclass(frozen=True)
class KvmAccess:
    """Whether accel=kvm is possible and how the QEMU user reaches ``/dev/kvm``."""

    usable: bool
    node: Path
    group: int | None = None  # give QEMU this supplementary group
    needs_grant: bool = False  # else make the probe user the node's owner for the probe
    reason: str = ""


def kvm_access(dev_root: Path, identity: ProbeIdentity) -> KvmAccess:
    """Decide whether a probe can use KVM. Raises nothing; the answer says why not."""
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
    if mode & 0o060 == 0o060 and st.st_gid != 0:
        return KvmAccess(True, node, group=st.st_gid)
    return KvmAccess(True, node, needs_grant=True)


@contextlib.contextmanager
def private_directory(runtime_dir: Path) -> Iterator[Path]:
    """A fresh 0700 directory under *runtime_dir* for one probe, removed with all its content.

    Raises :class:`ProbeSandboxError` when it cannot be created.
    """
    try:
        runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="probe-", dir=runtime_dir))
    except OSError as err:
        raise ProbeSandboxError(f"cannot create a probe directory in {runtime_dir}: {err}") from err
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            log.error("could not remove probe directory %s", path)
