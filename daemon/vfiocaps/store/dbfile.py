"""The cache's file on disk: which file was opened, and moving a damaged one aside."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..errors import StoreError

log = logging.getLogger("vfiocaps.store.sqlite")


class StoreCorruptError(StoreError):
    """The database file is not a usable SQLite database of ours."""


class StoreUnavailableError(StoreError):
    """The database cannot be written now (read-only, disk full, locked); it may recover."""


class DatabaseFile:
    """The SQLite file *path* with its WAL and shared-memory files.

    While open, the file's identity (device and inode) is remembered: writes through a
    descriptor of a file that was replaced or removed would be lost at the next start. A
    damaged file is renamed aside (``<name>.corrupt-<unix time>``), not replaced: a rename out
    of the way, kept for an administrator to look at, not a new content for the same file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def opened(self) -> None:
        """The file was just opened: remember which one it is."""
        self._identity = self._stat()

    def closed(self) -> None:
        """The file was closed: nothing to check any longer."""
        self._identity = None

    def check_not_replaced(self, action: str) -> None:
        """Treat a file replaced or removed behind our back as damaged.

        Raises:
            StoreCorruptError: the path no longer names the file that was opened.
        """
        if self._identity is not None and self._stat() != self._identity:
            raise StoreCorruptError(f"{action}: {self.path} was replaced or removed while open")

    def move_aside(self, reason: str) -> Path:
        """Rename the database (and its WAL and shared-memory files) out of the way.

        Raises:
            StoreUnavailableError: the files cannot be renamed.
        """
        target = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    os.replace(source, f"{target}{suffix}")
        except OSError as err:
            raise StoreUnavailableError(f"cannot move {self.path} aside: {err}") from err
        log.warning("cache %s is unusable (%s); moved to %s, rebuilding", self.path, reason, target)
        return target
