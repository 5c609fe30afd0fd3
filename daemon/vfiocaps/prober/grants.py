"""Device nodes lent to the probe user: the grant, and giving nodes back after a crash.

A grant makes the probe user the owner of one character device node (``/dev/vfio/N``, or
``/dev/kvm`` when its group cannot be used) for the length of a probe. Before the node changes,
a record is written to the journal (:mod:`.grantjournal`), so that a crash leaves a trace.

Every change of the journal and of a node happens under an ``flock`` of the journal directory, so
that several root processes (vfiocapsd, ``vfiocapsctl probe``) share it without revoking each
other's grants. A node is opened with ``O_PATH | O_NOFOLLOW`` (never through a symbolic link),
must be a character device, and is changed through that descriptor. It is given back only if
it is still the same node (device number and inode: devtmpfs numbers each node it creates
anew, so a group number given to a new device is a new inode) and still owned by the probe
user; its POSIX ACL is removed first, since the probe user could have added one meanwhile.

Recovery (at start, before any probe) gives back the nodes of dead owners' records made in this
boot, discards other boots' records (their nodes were created anew at boot), and resets *leaked*
nodes: owned by the probe user with no live record. A leaked ``/dev/vfio/N`` becomes
``root:root 0600``, the kernel's and udev's default for a group node; a leaked ``/dev/kvm``
becomes ``root:kvm 0660`` (``root:root 0600`` without a ``kvm`` group), never wider than
Debian's udev rule; ``udevadm trigger /dev/kvm`` re-applies a local rule.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..bootid import BOOT_ID_PATH, read_boot_id
from ..errors import ProbeBusyError
from ..hostpaths import DEV_ROOT
from ..ledger import Recovery
from .grantjournal import (
    GrantError,
    GrantJournal,
    GrantRecord,
    NodeState,
)

log = logging.getLogger("vfiocaps.prober")

ACL_XATTR = "system.posix_acl_access"
KVM_GROUP = "kvm"


def reset_state(node: Path, dev_root: Path) -> NodeState:
    """What a leaked *node* is reset to (see the module's docstring)."""
    if node == dev_root / "kvm":
        try:
            return NodeState(0, grp.getgrnam(KVM_GROUP).gr_gid, 0o660)
        except KeyError:
            pass
    return NodeState(0, 0, 0o600)


def _open_node(node: Path) -> int:
    """An ``O_PATH`` descriptor of the character device *node* (no link followed).

    Raises ``FileNotFoundError`` when it is gone and :class:`GrantError` when it is not a
    character device or cannot be opened.
    """
    try:
        fd = os.open(node, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise GrantError(f"cannot open {node}: {err.strerror}") from err
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        os.close(fd)
        raise GrantError(f"{node} is not a character device (a link or a file?); not granted")
    return fd


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _set_state(fd: int, state: NodeState) -> None:
    """Give the node behind *fd* exactly *state*, without a POSIX ACL. Raises ``OSError``."""
    try:
        os.removexattr(_fd_path(fd), ACL_XATTR)
    except OSError as err:
        if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
    os.chown(_fd_path(fd), state.uid, state.gid)
    os.chmod(_fd_path(fd), state.mode)


def _forget(journal: GrantJournal | None, record: GrantRecord) -> None:
    if journal is not None:
        journal.forget(record)


@dataclass
class _Grant:
    record: GrantRecord
    holders: int = 0


@dataclass
class NodeGrants:
    """Temporary ownership of device nodes, shared by concurrent probes (reference counted).

    The first grant of a node records it and makes the probe user its owner; the last release
    gives it back. Only used when vfiocapsd is root. Without a *journal* nothing is written
    (and nothing can be recovered).
    """

    journal: Path | None = None
    dev_root: Path = DEV_ROOT
    boot_id_path: Path = BOOT_ID_PATH
    _grants: dict[Path, _Grant] = field(default_factory=dict)
    _owner: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(6)}")
    _journal: GrantJournal | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.journal is not None:
            self._journal = GrantJournal(self.journal, self._owner, self.boot_id_path)

    # ---- the journal ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, owning: bool = False) -> Iterator[GrantJournal | None]:
        """Hold the journal's lock; with *owning*, make sure our own owner lock exists first.
        Raises :class:`GrantError`."""
        if self._journal is None:
            yield None
            return
        with self._journal.locked(owning):
            yield self._journal

    def _drop_owner(self, journal: GrantJournal | None) -> None:
        """With nothing lent, our owner lock goes (it only vouches for records)."""
        if journal is not None and not self._grants:
            journal.drop_owner()

    def _live_holder(self, journal: GrantJournal | None, st: os.stat_result) -> GrantRecord | None:
        """A live process's record of the node *st* describes, if any."""
        if journal is None:
            return None
        for record in journal.records():
            if (record.rdev, record.ino) != (st.st_rdev, st.st_ino):
                continue
            if self._held(journal, record):
                return record
        return None

    def _held(self, journal: GrantJournal, record: GrantRecord) -> bool:
        """Whether *record* is a live grant: one of ours in use, or a live process's."""
        if record.owner == self._owner:
            return Path(record.node) in self._grants
        return journal.owner_alive(record.owner)

    # ---- grant and release ------------------------------------------------------------------

    @contextlib.contextmanager
    def granted(self, node: Path, uid: int) -> Iterator[None]:
        """Give *uid* read-write access to *node* for the duration of the ``with`` block.

        Raises :class:`GrantError` when the node is missing, not a character device or cannot
        be changed, and :class:`~vfiocaps.errors.ProbeBusyError` when another live process has
        lent it to the probe user.
        """
        self._acquire(node, uid)
        try:
            yield
        finally:
            self._release(node)

    def _acquire(self, node: Path, uid: int) -> None:
        grant = self._grants.get(node)
        if grant is None:
            with self._locked(owning=True) as journal:
                try:
                    record = self._lend(journal, node, uid)
                except BaseException:
                    self._drop_owner(journal)
                    raise
            grant = self._grants[node] = _Grant(record)
        grant.holders += 1

    def _lend(self, journal: GrantJournal | None, node: Path, uid: int) -> GrantRecord:
        try:
            fd = _open_node(node)
        except FileNotFoundError as err:
            raise GrantError(f"cannot grant {node}: it does not exist") from err
        try:
            st = os.fstat(fd)
            original = NodeState(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            if st.st_uid == uid:
                holder = self._live_holder(journal, st)
                if holder is not None:
                    raise ProbeBusyError(
                        f"{node} is lent to the probe user by another vfiocaps process "
                        f"(pid {holder.pid})"
                    )
                original = reset_state(node, self.dev_root)
                log.warning(
                    "%s was left owned by the probe user; it goes back to %s", node, original
                )
            record = GrantRecord(
                node=str(node),
                rdev=st.st_rdev,
                ino=st.st_ino,
                original=original,
                probe_uid=uid,
                owner=self._owner,
                pid=os.getpid(),
                boot_id=read_boot_id(self.boot_id_path),
            )
            try:
                if journal is not None:
                    journal.write(record)
                os.chown(_fd_path(fd), uid, -1)
                if original.mode & 0o600 != 0o600:
                    os.chmod(_fd_path(fd), original.mode | 0o600)
            except (OSError, ValueError) as err:
                self._give_back(journal, record)
                raise GrantError(f"cannot grant {node} to uid {uid}: {err}") from err
            return record
        finally:
            os.close(fd)

    def _release(self, node: Path) -> None:
        grant = self._grants[node]
        grant.holders -= 1
        if grant.holders > 0:
            return
        del self._grants[node]
        try:
            with self._locked() as journal:
                self._give_back(journal, grant.record)
                self._drop_owner(journal)
        except GrantError as err:
            log.error("cannot give %s back: %s", node, err)

    def _give_back(self, journal: GrantJournal | None, record: GrantRecord) -> Recovery:
        """Restore the recorded node if it is still the one lent and drop the record: UNDONE
        (restored), GONE (the node is gone or changed hands: left as it is), or KEEP (it could
        not be restored: the record stays for the next recovery). Raises nothing."""
        node = Path(record.node)
        try:
            fd = _open_node(node)
        except FileNotFoundError:
            _forget(journal, record)  # the device went away with its node
            return Recovery.GONE
        except GrantError as err:
            log.warning("%s; its grant record is dropped", err)
            _forget(journal, record)
            return Recovery.GONE
        try:
            st = os.fstat(fd)
            if (st.st_rdev, st.st_ino) != (record.rdev, record.ino):
                log.warning("%s is another node now; left as it is", node)
            elif st.st_uid != record.probe_uid:
                log.warning("%s was given to uid %d meanwhile; left as it is", node, st.st_uid)
            else:
                _set_state(fd, record.original)
                _forget(journal, record)
                return Recovery.UNDONE
            _forget(journal, record)
            return Recovery.GONE
        except OSError as err:
            log.error("cannot restore owner and mode of %s: %s", node, err)
            return Recovery.KEEP  # the record stays for the next recovery
        finally:
            os.close(fd)

    # ---- recovery ---------------------------------------------------------------------------

    def recover(self, probe_uid: int | None) -> list[Path]:
        """Give back nodes lent by dead processes, then reset leaked nodes; return them all.

        *probe_uid*: the probe user's uid now (None when unknown: no leak sweep). Raises
        :class:`GrantError` when the journal directory is unsafe to use.
        """
        if self.journal is None:
            return []
        changed: list[Path] = []
        with self._locked() as journal:
            if journal is None:
                return []

            def give_back(record: GrantRecord) -> Recovery:
                if not self._recoverable(record):
                    log.error("refusing the grant record of %s", record.node)
                    return Recovery.GONE
                log.warning("giving back %s, left granted by pid %d", record.node, record.pid)
                return self._give_back(journal, record)

            alive = functools.partial(self._held, journal)
            changed += [Path(record.node) for record in journal.ledger.recover(alive, give_back)]
            journal.drop_dead_owner_locks()
            if probe_uid is not None:
                changed += self._reset_leaked(journal, probe_uid)
        return changed

    def _recoverable(self, record: GrantRecord) -> bool:
        """Only group nodes and /dev/kvm, lent to a user other than root, are ever given back."""
        node = Path(os.path.normpath(record.node))
        vfio = self.dev_root / "vfio"
        in_place = node == self.dev_root / "kvm" or (node.parent == vfio and node.name.isdigit())
        return in_place and record.probe_uid != 0

    def _reset_leaked(self, journal: GrantJournal, probe_uid: int) -> list[Path]:
        candidates = [self.dev_root / "kvm"]
        with contextlib.suppress(OSError):
            vfio = self.dev_root / "vfio"
            candidates += sorted(vfio / name for name in os.listdir(vfio) if name.isdigit())
        reset = []
        for node in candidates:
            try:
                fd = _open_node(node)
            except (FileNotFoundError, GrantError):
                continue
            try:
                st = os.fstat(fd)
                if st.st_uid != probe_uid or self._live_holder(journal, st) is not None:
                    continue
                state = reset_state(node, self.dev_root)
                log.warning("%s is owned by the probe user with no grant: reset to %s", node, state)
                _set_state(fd, state)
                reset.append(node)
            except OSError as err:
                log.error("cannot reset %s: %s", node, err)
            finally:
                os.close(fd)
        return reset

    def active(self) -> dict[Path, NodeState]:
        """Nodes currently granted, with the state they will be restored to."""
        return {node: grant.record.original for node, grant in self._grants.items()}
