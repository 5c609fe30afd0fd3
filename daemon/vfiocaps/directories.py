"""The daemon's own directories (cache, runtime): made private, refused when others could write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UnsafeDirectoryError


def _problem(path: Path, st: os.stat_result, uid: int) -> str | None:
    if st.st_uid not in (0, uid):
        return f"{path} is owned by uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{path} may be written by other users"
    return None


def ensure_private_directory(path: Path, what: str) -> None:
    """Create *path* (mode 0700) if missing, then refuse it unless it is safe to hold state that
    root acts on: a real directory (not a symbolic link), owned by the daemon's user, writable
    by nobody else, below directories only root or that user may change (or sticky ones).

    Raises:
        UnsafeDirectoryError: it cannot be created or is not safe; the message says what to do.
    """
    uid = os.geteuid()
    advice = (
        f"remove it (or make it a directory of uid {uid} with mode 0700) and start again, "
        f"or choose another {what} directory"
    )
    try:
        if not os.path.lexists(path):
            os.makedirs(path, mode=0o700)
        st = os.lstat(path)
    except OSError as err:
        raise UnsafeDirectoryError(f"cannot create the {what} directory {path}: {err}") from err
    if stat.S_ISLNK(st.st_mode):
        problem: str | None = f"{path} is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = f"{path} is not a directory"
    elif st.st_uid != uid:
        problem = f"{path} is owned by uid {st.st_uid}, not by the daemon's user (uid {uid})"
    elif st.st_mode & 0o022:
        problem = f"{path} may be written by its group or by everybody"
    else:
        problem = None
        parent = Path(os.path.realpath(path.parent))
        for ancestor in (parent, *parent.parents):
            try:
                problem = _problem(ancestor, os.stat(ancestor), uid)
            except OSError as err:
                problem = f"{ancestor}: {err.strerror}"
            if problem is not None:
                break
    if problem is not None:
        raise UnsafeDirectoryError(f"refusing the {what} directory {path}: {problem}; {advice}")
