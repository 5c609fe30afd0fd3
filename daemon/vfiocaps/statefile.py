"""State records: written so that a crash leaves the old content or the new; their writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


def replace_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write *text* to a fresh temporary file beside *path* (``.NAME.*.tmp``, created
    exclusively, so no planted link is followed), flush it to disk and rename it over *path*.

    Raises:
        OSError: the file cannot be written; the temporary file is removed then.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


OWNER_SUFFIX = ".owner"


class OwnerLock:
    """Who wrote the records in *directory*: each writer holds an ``flock`` on its file
    ``<pid>.owner`` there for as long as it runs, so a record's writer is alive exactly while
    that file is locked, whatever process has its pid since."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def hold(self) -> None:
        """Create and lock this process's owner file (once; the lock goes with the process).

        Raises:
            OSError: the file cannot be created or locked.
        """
        if self._fd is not None:
            return
        path = self.directory / f"{os.getpid()}{OWNER_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def alive(self, pid: int) -> bool:
        """Whether the writer *pid* of a record still runs: its owner file is locked. An owner
        file found unlocked is removed. Without one (a record of an older version) the pid
        alone is asked, and a reused pid looks alive: the record is then kept, never taken from
        a running writer. A file that cannot be looked at counts as alive. Raises nothing."""
        if pid <= 0:
            return False
        path = self.directory / f"{pid}{OWNER_SUFFIX}"
        try:
            if lock_held(path):
                return True
        except FileNotFoundError:
            return _pid_alive(pid)
        except OSError:
            return True
        with contextlib.suppress(OSError):
            path.unlink()
        return False


def lock_held(path: Path) -> bool:
    """Whether a process holds an ``flock`` on the file *path* (a link is not followed).

    Raises:
        OSError: *path* cannot be opened (``FileNotFoundError`` when there is none).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
