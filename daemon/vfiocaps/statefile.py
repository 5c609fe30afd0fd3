"""Writing a small state file so that a crash leaves its old content or its new, never a mix."""

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
