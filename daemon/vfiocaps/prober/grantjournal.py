"""The on-disk journal of lent device nodes: its records, their files, and the owner locks.

The journal is a directory (under the runtime directory) shared by every root process that
lends nodes:

* ``<owner>.lock``: created and ``flock``-ed by each process that grants, held for as long as
  it has a node lent (until it exits, at the latest). A record whose owner's lock can be taken,
  or is gone, belongs to a dead process.
* ``<owner>-<node hash>.json``: the node's path, device number and inode, its original owner
  and mode, the probe user's uid, the owner's pid and the boot id: the entries of a
  :class:`vfiocaps.ledger.Ledger`, read, refused and recovered by its rules.

Every change of the journal happens under an ``flock`` of the directory, which must be ours and
writable by nobody else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ProbeError
from ..hostpaths import BOOT_ID_PATH
from ..ledger import Ledger, LedgerFormat
from ..statefile import lock_held

log = logging.getLogger("vfiocaps.prober")


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

    @classmethod
    def from_value(cls, name: str, values: Any) -> GrantRecord:
        """A record as read from the file *name*.

        Raises:
            ValueError: it is anything but a well-formed record.
        """
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

    def valid(self) -> bool:
        return os.path.isabs(self.node) and "\0" not in self.node and self.owner != ""


def _record_name(record: GrantRecord) -> str:
    """A record's file: its owner's name and a hash of its node."""
    return f"{record.owner}-{hashlib.sha256(os.fsencode(record.node)).hexdigest()[:32]}.json"


GRANT_RECORDS: LedgerFormat[GrantRecord] = LedgerFormat(
    what="grant record",
    name_of=_record_name,
    is_entry_name=lambda name: name.endswith(".json"),
    encode=asdict,
    decode=GrantRecord.from_value,
    valid=GrantRecord.valid,
    boot_of=lambda record: record.boot_id,
)


def _check_private_directory(path: Path, st: os.stat_result) -> None:
    """Raises :class:`GrantError` unless *path* (*st*) is ours and nobody else may write it."""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise GrantError(
            f"the grant journal {path} is not a directory owned by uid {os.geteuid()} that only "
            f"its owner may write; remove it and start again"
        )


class GrantJournal:
    """The journal directory *path*, as used by the process whose records are named *owner*."""

    def __init__(self, path: Path, owner: str, boot_id_path: Path = BOOT_ID_PATH) -> None:
        self.path = path
        self.owner = owner
        self.ledger = Ledger(path, GRANT_RECORDS, boot_id_path)
        self._owner_fd: int | None = None

    @contextlib.contextmanager
    def locked(self, owning: bool = False) -> Iterator[None]:
        """Hold the journal's lock (an ``flock`` of its directory); with *owning*, make sure our
        own owner lock exists first. Raises :class:`GrantError`, also for an ``OSError`` raised
        inside the block."""
        journal = self.path
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
                    journal / f"{self.owner}.lock",
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._owner_fd = fd
            yield
        except OSError as err:
            raise GrantError(f"cannot use the grant journal {journal}: {err}") from err
        finally:
            os.close(lock)

    def drop_owner(self) -> None:
        """Remove our owner lock; only once nothing is lent (it only vouches for records)."""
        if self._owner_fd is None:
            return
        (self.path / f"{self.owner}.lock").unlink(missing_ok=True)
        os.close(self._owner_fd)
        self._owner_fd = None

    def write(self, record: GrantRecord) -> None:
        """Write *record* durably (replacing an older one of the same owner and node).

        Raises ``OSError`` (``ValueError`` for a record that is not valid).
        """
        self.ledger.add(record)

    def forget(self, record: GrantRecord) -> None:
        """Remove the file of *record*, if it is still there."""
        self.ledger.remove(record)

    def owner_alive(self, owner: str) -> bool:
        """Whether the process named *owner* still holds its owner lock."""
        if owner == "":
            return False
        try:
            return lock_held(self.path / f"{owner}.lock")
        except OSError:
            return False

    def records(self) -> list[GrantRecord]:
        """Every record (unreadable ones and those not ours are logged and removed)."""
        return self.ledger.entries()

    def drop_dead_owner_locks(self) -> None:
        """Remove the owner locks of processes that are gone."""
        for lock in self.path.glob("*.lock"):
            owner = lock.name.removesuffix(".lock")
            if owner != self.owner and not self.owner_alive(owner):
                lock.unlink(missing_ok=True)
