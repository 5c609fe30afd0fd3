"""The on-disk journal of lent device nodes: its records, their files, and the owner locks.

The journal is a directory (under the runtime directory) shared by every root process that
lends nodes:

* ``<owner>.lock``: created and ``flock``-ed by each process that grants, held for as long as
  it has a node lent (until it exits, at the latest). A record whose owner's lock can be taken,
  or is gone, belongs to a dead process.
* ``<owner>-<node hash>.json``: the node's path, device number and inode, its original owner
  and mode, the probe user's uid, the owner's pid and the boot id.

Every change of the journal happens under an ``flock`` of the directory, which must be ours and
writable by nobody else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ProbeError
from ..statefile import lock_held, replace_file

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


def _check_private_directory(path: Path, st: os.stat_result) -> None:
    """Raises :class:`GrantError` unless *path* (*st*) is ours and nobody else may write it."""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise GrantError(
            f"the grant journal {path} is not a directory owned by uid {os.geteuid()} that only "
            f"its owner may write; remove it and start again"
        )


class GrantJournal:
    """The journal directory *path*, as used by the process whose records are named *owner*."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
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

    def _record_path(self, owner: str, node: str) -> Path:
        name = hashlib.sha256(os.fsencode(node)).hexdigest()[:32]
        return self.path / f"{owner}-{name}.json"

    def write(self, record: GrantRecord) -> None:
        """Write *record* durably (replacing an older one of the same owner and node).

        Raises ``OSError``.
        """
        replace_file(self._record_path(record.owner, record.node), record.to_json())

    def forget(self, record: GrantRecord) -> None:
        """Remove the file of *record*, if it is still there."""
        with contextlib.suppress(FileNotFoundError):
            self._record_path(record.owner, record.node).unlink()

    def owner_alive(self, owner: str) -> bool:
        """Whether the process named *owner* still holds its owner lock."""
        if owner == "":
            return False
        try:
            return lock_held(self.path / f"{owner}.lock")
        except OSError:
            return False

    def records(self) -> Iterator[tuple[Path, GrantRecord | None]]:
        """Every record file with its record (None when it is unreadable or not ours)."""
        for path in sorted(self.path.glob("*.json")):
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

    def drop_dead_owner_locks(self) -> None:
        """Remove the owner locks of processes that are gone."""
        for lock in self.path.glob("*.lock"):
            owner = lock.name.removesuffix(".lock")
            if owner != self.owner and not self.owner_alive(owner):
                lock.unlink(missing_ok=True)
