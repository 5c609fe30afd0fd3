"""State records: written so that a crash leaves the old content or the new; their writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
from pathlib import Path

from .hostpaths import PROC_ROOT


def replace_at(directory: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace the file *name* in the directory open as *directory* with *data*, so that a
    crash leaves the old content or the new: *data* goes to a fresh dot-file beside it
    (``.NAME.<random>.tmp``, created exclusively without following links, so nothing planted
    there is written through), is flushed to disk, renamed over *name*, and the directory is
    flushed too (the rename itself survives a power loss).

    Raises:
        OSError: the file cannot be written; the temporary file is removed then.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        temporary = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temporary, flags, mode, dir_fd=directory)
            break
        except FileExistsError:
            continue
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory)
        raise
    os.fsync(directory)


def replace_file(path: Path, text: str, mode: int = 0o600) -> None:
    """:func:`replace_at` for *path*: its directory is opened as it is named.

    Raises:
        OSError: the directory cannot be opened or the file cannot be written.
    """
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace_at(directory, path.name, text.encode(), mode)
    finally:
        os.close(directory)


OWNER_SUFFIX = ".owner"

# The owner files this process holds, by directory: one lock per directory and process, however
# many ledgers or threads take it.
_HELD: dict[Path, int] = {}
_HELD_LOCK = threading.Lock()


def process_start(pid: int, proc_root: Path = PROC_ROOT) -> str | None:
    """When the process *pid* started (clock ticks since boot, field 22 of ``/proc/PID/stat``):
    with the pid, it names one process of a boot, so a reused pid is told apart. ``None`` when
    there is no such process or it cannot be read. Raises nothing."""
    try:
        with open(proc_root / str(pid) / "stat", "rb") as stream:
            stat = stream.read(4096)
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count after the last ")".
    fields = stat.rpartition(b")")[2].split()
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return fields[19].decode()


class OwnerLock:
    """Who wrote the records in *directory*: each writer holds an ``flock`` on its file
    ``<pid>.owner`` there for as long as it runs, so a record's writer is alive exactly while
    that file is locked, whatever process has its pid since. A record also names its writer's
    start time (:meth:`started`), which tells a reused pid apart when the owner file is gone."""

    def __init__(self, directory: Path, proc_root: Path = PROC_ROOT) -> None:
        self.directory = directory
        self._proc_root = proc_root

    def started(self) -> str:
        """This process's start time, to be written in its records (``""``: unreadable)."""
        return process_start(os.getpid(), self._proc_root) or ""

    def hold(self) -> None:
        """Create and lock this process's owner file (once per directory and process, from any
        thread; the lock goes with the process).

        Raises:
            OSError: the file cannot be created or locked.
        """
        key = Path(os.path.abspath(self.directory))
        with _HELD_LOCK:
            if key in _HELD:
                return
            path = key / f"{os.getpid()}{OWNER_SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
            _HELD[key] = fd

    def alive(self, pid: int, started: str = "") -> bool:
        """Whether the writer *pid* (started at *started*, as its record says) of a record
        still runs: its owner file is locked. An owner file found unlocked is removed. Without
        one (deleted, or a record of an older version) the process is asked: it runs when
        *pid* exists and, where the record names a start time, started then, so a reused pid
        is not taken for the writer. A record without a start time has only its pid, and a
        reused pid looks alive: the record is then kept (until the boot ends), never taken
        from a running writer. A file that cannot be looked at counts as alive. Raises
        nothing."""
        if pid <= 0:
            return False
        path = self.directory / f"{pid}{OWNER_SUFFIX}"
        try:
            if lock_held(path):
                return True
        except FileNotFoundError:
            if started:
                return process_start(pid, self._proc_root) == started
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
