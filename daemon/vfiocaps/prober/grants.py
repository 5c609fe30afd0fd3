"""Device nodes lent to the probe user: the grant, its on-disk journal, and recovery after a crash.

A grant makes the probe user the owner of one character device node (``/dev/vfio/N``, or
``/dev/kvm`` when its group cannot be used) for the length of a probe. Before the node changes,
a record is written to the journal directory (under the runtime directory):

* ``<owner>.lock``: created and ``flock``-ed by each process that grants, held for as long as
  it has a node lent (until it exits, at the latest). A record whose owner's lock can be taken,
  or is gone, belongs to a dead process.
* ``<owner>-<node hash>.json``: the node's path, device number and inode, its original owner
  and mode, the probe user's uid, the owner's pid and the boot id.

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
import fcntl
import grp
import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProbeBusyError, ProbeError

log = logging.getLogger("vfiocaps.prober")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
ACL_XATTR = "system.posix_acl_access"
KVM_GROUP = "kvm"


class GrantError(ProbeError):
    """A device node cannot be lent to the probe user (missing, not a device, unchangeable)."""


@dataclass(frozen=True)
class NodeState:
    """Owner and permission bits of a device node, to be restored exactly."""

    uid: int
    gid: int
    mode: int


@dataclass(frozen=True)
class GrantRecord:
    """One lent node, as written to the journal before the node changes."""

    node: str
    rdev: int
    ino: int
    original: NodeState
    probe_uid: int
    owner: str  # "<pid>-<random>", the name of the owner's lock file
    pid: int
    boot_id: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GrantRecord:
        """Parse a record. Raises ``ValueError`` for anything but a well-formed record."""
        values: Any = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError("not an object")
        original = values.get("original")
        if not isinstance(original, dict):
            raise ValueError("no original state")
        ints = [values.get(k) for k in ("rdev", "ino", "probe_uid", "pid")]
        ints += [original.get(k) for k in ("uid", "gid", "mode")]
        if not all(type(v) is int and v >= 0 for v in ints):
            raise ValueError("a number is missing or negative")
        texts = [values.get(k) for k in ("node", "owner", "boot_id")]
        if not all(isinstance(v, str) for v in texts):
            raise ValueError("a string is missing")
        return cls(
            node=values["node"],
            rdev=values["rdev"],
            ino=values["ino"],
            original=NodeState(original["uid"], original["gid"], original["mode"]),
            probe_uid=values["probe_uid"],
            owner=values["owner"],
            pid=values["pid"],
            boot_id=values["boot_id"],
        )


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id ("" when unreadable). Raises nothing."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


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


def _check_private_directory(path: Path, st: os.stat_result) -> None:
    """Raises :class:`GrantError` unless *path* (*st*) is ours and nobody else may write it."""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise GrantError(
            f"the grant journal {path} is not a directory owned by uid {os.geteuid()} that only "
            f"its owner may write; remove it and start again"
        )


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
    dev_root: Path = Path("/dev")
    boot_id_path: Path = BOOT_ID_PATH
    _grants: dict[Path, _Grant] = field(default_factory=dict)
    _owner: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(6)}")
    _owner_fd: int | None = None

    # ---- the journal ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, owning: bool = False) -> Iterator[Path | None]:
        """Hold the journal's lock (an ``flock`` of its directory); with *owning*, make sure our
        own owner lock exists first. Raises :class:`GrantError`."""
        if self.journal is None:
            yield None
            return
        journal = self.journal
        try:
            with contextlib.suppress(FileExistsError):
                journal.mkdir(mode=0o700)
            lock = os.open(journal, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise GrantError(f"cannot use the grant journal {journal}: {err}") from err
        try:
            _check_private_directory(journal, os.fstat(lock))
            fcntl.flock(lock, fcntl.LOCK_EX)
            if owning and self._owner_fd is None:
                fd = os.open(
                    journal / f"{self._owner}.lock",
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._owner_fd = fd
            yield journal
        except OSError as err:
            raise GrantError(f"cannot use the grant journal {journal}: {err}") from err
        finally:
            os.close(lock)

    def _drop_owner(self, journal: Path | None) -> None:
        """With nothing lent, our owner lock goes (it only vouches for records)."""
        if journal is None or self._owner_fd is None or self._grants:
            return
        (journal / f"{self._owner}.lock").unlink(missing_ok=True)
        os.close(self._owner_fd)
        self._owner_fd = None

    def _record_path(self, journal: Path, owner: str, node: str) -> Path:
        name = hashlib.sha256(os.fsencode(node)).hexdigest()[:32]
        return journal / f"{owner}-{name}.json"

    def _write(self, journal: Path | None, record: GrantRecord) -> None:
        if journal is None:
            return
        path = self._record_path(journal, record.owner, record.node)
        temporary = path.with_suffix(".tmp")
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        with os.fdopen(fd, "w") as out:
            out.write(record.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)

    def _forget(self, journal: Path | None, record: GrantRecord) -> None:
        if journal is not None:
            with contextlib.suppress(FileNotFoundError):
                self._record_path(journal, record.owner, record.node).unlink()

    @staticmethod
    def _owner_alive(journal: Path, owner: str) -> bool:
        if owner == "":
            return False
        try:
            fd = os.open(journal / f"{owner}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @staticmethod
    def _records(journal: Path) -> Iterator[tuple[Path, GrantRecord | None]]:
        for path in sorted(journal.glob("*.json")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd) as handle:
                    st = os.fstat(handle.fileno())
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                        raise ValueError("not a regular file of ours")
                    yield path, GrantRecord.from_json(handle.read(64 * 1024))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                log.error("discarding unreadable grant record %s: %s", path, err)
                yield path, None

    def _live_holder(self, journal: Path | None, st: os.stat_result) -> GrantRecord | None:
        """A live process's record of the node *st* describes, if any."""
        if journal is None:
            return None
        for _, record in self._records(journal):
            if record is None or (record.rdev, record.ino) != (st.st_rdev, st.st_ino):
                continue
            if self._held(journal, record):
                return record
        return None

    def _held(self, journal: Path, record: GrantRecord) -> bool:
        """Whether *record* is a live grant: one of ours in use, or a live process's."""
        if record.owner == self._owner:
            return Path(record.node) in self._grants
        return self._owner_alive(journal, record.owner)

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

    def _lend(self, journal: Path | None, node: Path, uid: int) -> GrantRecord:
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
                self._write(journal, record)
                os.chown(_fd_path(fd), uid, -1)
                if original.mode & 0o600 != 0o600:
                    os.chmod(_fd_path(fd), original.mode | 0o600)
            except OSError as err:
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

    def _give_back(self, journal: Path | None, record: GrantRecord) -> bool:
        """Restore the recorded node if it is still the one lent; drop the record. Raises
        nothing; returns whether the node was changed."""
        node = Path(record.node)
        try:
            fd = _open_node(node)
        except FileNotFoundError:
            self._forget(journal, record)  # the device went away with its node
            return False
        except GrantError as err:
            log.warning("%s; its grant record is dropped", err)
            self._forget(journal, record)
            return False
        try:
            st = os.fstat(fd)
            if (st.st_rdev, st.st_ino) != (record.rdev, record.ino):
                log.warning("%s is another node now; left as it is", node)
            elif st.st_uid != record.probe_uid:
                log.warning("%s was given to uid %d meanwhile; left as it is", node, st.st_uid)
            else:
                _set_state(fd, record.original)
                self._forget(journal, record)
                return True
            self._forget(journal, record)
            return False
        except OSError as err:
            log.error("cannot restore owner and mode of %s: %s", node, err)
            return False  # the record stays for the next recovery
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
        boot_id = read_boot_id(self.boot_id_path)
        with self._locked() as journal:
            if journal is None:
                return []
            for path, record in self._records(journal):
                if record is None:
                    path.unlink(missing_ok=True)
                elif self._held(journal, record):
                    continue
                elif boot_id and record.boot_id != boot_id:
                    log.info("dropping grant record of %s from another boot", record.node)
                    path.unlink(missing_ok=True)
                elif not self._recoverable(record):
                    log.error("refusing grant record %s for %s", path, record.node)
                    path.unlink(missing_ok=True)
                else:
                    log.warning("giving back %s, left granted by pid %d", record.node, record.pid)
                    if self._give_back(journal, record):
                        changed.append(Path(record.node))
            for lock in journal.glob("*.lock"):
                owner = lock.name.removesuffix(".lock")
                if owner != self._owner and not self._owner_alive(journal, owner):
                    lock.unlink(missing_ok=True)
            if probe_uid is not None:
                changed += self._reset_leaked(journal, probe_uid)
        return changed

    def _recoverable(self, record: GrantRecord) -> bool:
        """Only group nodes and /dev/kvm, lent to a user other than root, are ever given back."""
        node = Path(os.path.normpath(record.node))
        vfio = self.dev_root / "vfio"
        in_place = node == self.dev_root / "kvm" or (node.parent == vfio and node.name.isdigit())
        return in_place and record.probe_uid != 0

    def _reset_leaked(self, journal: Path, probe_uid: int) -> list[Path]:
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
