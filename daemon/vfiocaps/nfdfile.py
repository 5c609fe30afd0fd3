"""The NFD feature file on disk: its directory vetted like the runtime directory, used by fd.

Root writes and removes a file in a directory that belongs to another program (nfd-worker's
``features.d``), so nothing on the way may be steered by another user. The directory is opened
one component at a time from ``/`` with ``O_NOFOLLOW`` (a link anywhere on the way is refused),
each ancestor owned by root or the daemon's user and writable by nobody else (unless sticky),
the directory itself owned by root or the daemon's user and writable by nobody else. No parent is
created; a missing ``features.d`` is created (0755) only inside a vetted parent. Everything after
that goes through the directory's descriptor: the old file is read with ``O_NOFOLLOW`` (a regular
file only, at most :data:`READ_LIMIT` bytes), the new one is written to a dot-file created
``O_EXCL`` and renamed over it (``statefile.replace_at``), and removal unlinks the name in that
directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsafeDirectoryError
from .statefile import replace_at

FILE_NAME = "vfiocaps"
# NFD ignores a feature file larger than this (source/local: MaxFeatureFileSize).
MAX_FILE_BYTES = 65536
# The most read of an existing file: one byte past NFD's limit tells a file that is too large.
READ_LIMIT = MAX_FILE_BYTES + 1
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _ancestor_problem(path: str, st: os.stat_result, uid: int) -> str | None:
    if st.st_uid not in (0, uid):
        return f"{path} is owned by uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{path} may be written by other users"
    return None


def _refuse(directory: Path, problem: str) -> UnsafeDirectoryError:
    return UnsafeDirectoryError(
        f"refusing the NFD features directory {directory}: {problem}; make every directory "
        f"on the way a real directory of root, writable by root alone (mkdir -p it), or name "
        f"another with --nfd-labels"
    )


def open_directory(directory: Path, create: bool = True) -> int:
    """A descriptor of *directory*, vetted (see the module's description); the caller closes it.
    With *create*, a missing last component is created inside its vetted parent.

    Raises:
        UnsafeDirectoryError: a component is a link, foreign or writable by others, is missing
            (a parent), or cannot be opened.
        FileNotFoundError: the directory itself is missing and *create* is false.
    """
    parts = directory.parts
    if not directory.is_absolute() or any(part in (".", "..") for part in parts):
        raise _refuse(directory, "not a plain absolute path")
    uid = os.geteuid()
    fd = os.open("/", _DIRECTORY_FLAGS)
    try:
        _check(fd, "/", uid, last=len(parts) == 1, directory=directory)
        for index, name in enumerate(parts[1:], start=2):
            last = index == len(parts)
            shown = os.path.join(*parts[:index])
            try:
                child = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not (last and create):
                    if last:
                        raise
                    raise _refuse(directory, f"{shown} does not exist") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                child = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as err:
                why = (
                    "is a symbolic link"
                    if err.errno in (errno.ELOOP, errno.ENOTDIR)
                    else (f"cannot be opened ({err.strerror})")
                )
                raise _refuse(directory, f"{shown} {why}") from err
            os.close(fd)
            fd = child
            _check(fd, shown, uid, last=last, directory=directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check(fd: int, shown: str, uid: int, *, last: bool, directory: Path) -> None:
    st = os.fstat(fd)
    if last:
        if st.st_uid not in (0, uid):
            raise _refuse(directory, f"it is owned by uid {st.st_uid}")
        if st.st_mode & 0o022:
            raise _refuse(directory, "it may be written by its group or by everybody")
        return
    problem = _ancestor_problem(shown, st, uid)
    if problem is not None:
        raise _refuse(directory, problem)


@dataclass(frozen=True)
class FeatureFile:
    """The feature file's place: a directory NFD reads and the file's name in it."""

    directory: Path
    name: str = FILE_NAME

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def read(self) -> str | None:
        """The file's current text, or None when it is missing, not a regular file, larger than
        NFD reads, or unreadable (the directory included).

        Raises:
            UnsafeDirectoryError: the directory is not safe to use.
        """
        try:
            directory = open_directory(self.directory, create=False)
        except FileNotFoundError:
            return None
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except OSError:
            return None
        finally:
            os.close(directory)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = b""
            while len(data) < READ_LIMIT:
                chunk = os.read(fd, READ_LIMIT - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            return None

    def write(self, text: str) -> None:
        """Replace the file with *text* at once (:func:`vfiocaps.statefile.replace_at`: a
        dot-file NFD skips, created anew, then renamed), world-readable since labels are public.

        Raises:
            UnsafeDirectoryError: the directory is not safe to use.
            OSError: the file cannot be written.
        """
        directory = open_directory(self.directory)
        try:
            replace_at(directory, self.name, text.encode(), 0o644)
        finally:
            os.close(directory)

    def remove(self) -> None:
        """Remove the file (NFD then drops the labels).

        Raises:
            UnsafeDirectoryError: the directory is not safe to use.
            OSError: the file cannot be removed (a missing one is no error).
        """
        try:
            directory = open_directory(self.directory, create=False)
        except FileNotFoundError:
            return
        try:
            # The dot-file an older vfiocapsd wrote through.
            with contextlib.suppress(FileNotFoundError):
                os.unlink("." + self.name, dir_fd=directory)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=directory)
        finally:
            os.close(directory)
