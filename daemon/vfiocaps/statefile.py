"""State records: written so a crash leaves the old content or the new, and whose writer lives."""

from __future__ import annotations

import contextlib
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


def owner_alive(pid: int) -> bool:
    """Whether the process *pid* that wrote a record still runs (a record of a running daemon is
    left to it). A pid that was reused looks alive: its record is then kept and acted on at a
    later start, never taken from a running owner. Pid 0 or less means no known owner."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
