"""Defensive sysfs access: bounded reads that never follow a link out of the sysfs root."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("vfiocaps.discovery")

# sysfs attributes are at most a page; anything longer is not what we expect to read.
ATTRIBUTE_LIMIT = 4096
# More entries than this in one sysfs directory is not a directory we understand.
DIRECTORY_LIMIT = 65536
_MAX_LINK_HOPS = 40


class SysfsTree:
    """Read-only view of a sysfs tree rooted at *root* (``/sys`` on a real host).

    Every method returns ``None`` (or an empty list) for anything it cannot or must not read: a
    vanished device, an unreadable or malformed attribute, a symlink loop, a link that leaves the
    root. It logs why at DEBUG (vanishing is normal) or WARNING (hostile or malformed content),
    and never raises for the content of the tree.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.normpath(root))
        self._root = str(self.root)
        # During one full scan: directories already seen not to be links (see :meth:`scan`).
        self._plain: set[str] | None = None

    @contextlib.contextmanager
    def scan(self) -> Iterator[None]:
        """Within this block, remember which path components are not links.

        A full scan resolves the same parent directories for every device; remembering them
        saves most ``readlink`` calls. Outside a scan nothing is remembered, so a tree that
        changes is always read as it is now.
        """
        outer = self._plain
        if outer is None:
            self._plain = set()
        try:
            yield
        finally:
            self._plain = outer

    # ---- paths ----------------------------------------------------------------------------

    def path(self, relative: str) -> Path:
        """The absolute path of *relative* (``devices/...`` or ``/devices/...``) in the tree."""
        return Path(os.path.normpath(self.root / relative.lstrip("/")))

    def contains(self, path: Path) -> bool:
        """Tell whether *path* (already normalised) lies inside the root."""
        return self._inside(str(path))

    def _inside(self, path: str) -> bool:
        root = self._root
        return path == root or path.startswith(root + "/") or root == "/"

    def resolve(self, path: Path) -> Path | None:
        """Resolve every symlink in *path* without leaving the root.

        Returns ``None`` when a link loops, points outside the root, or a component vanished.
        Only links inside the root are followed; the root itself is taken as it is.
        """
        resolved = self.resolve_str(str(path))
        return Path(resolved) if resolved is not None else None

    def resolve_str(self, path: str) -> str | None:
        """:meth:`resolve` on plain strings, for readers that walk many paths."""
        normal = os.path.normpath(path)
        root = self._root
        if not self._inside(normal):
            log.warning("sysfs: %s is outside %s; not read", path, root)
            return None
        # Components still to walk, the next one last.
        pending = normal[len(root) :].split("/")
        pending.reverse()
        resolved = root
        plain = self._plain
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                resolved = resolved.rpartition("/")[0] or "/"
                # *resolved* was inside the root; its parent is too unless it is shorter.
                if len(resolved) < len(root):
                    log.warning("sysfs: %s leads outside %s; not read", path, root)
                    return None
                continue
            candidate = resolved + "/" + part if resolved != "/" else "/" + part
            if plain is not None and candidate in plain:
                resolved = candidate
                continue
            try:
                target = os.readlink(candidate)
            except OSError as err:
                if err.errno == errno.EINVAL:  # not a link
                    if plain is not None:
                        plain.add(candidate)
                    resolved = candidate
                    continue
                if err.errno in (errno.ENOENT, errno.ENOTDIR):
                    log.debug("sysfs: %s vanished", candidate)
                else:
                    log.warning("sysfs: cannot inspect %s: %s", candidate, err.strerror)
                return None
            hops += 1
            if hops > _MAX_LINK_HOPS:
                log.warning("sysfs: too many links resolving %s (a loop?); not read", path)
                return None
            if target.startswith("/"):
                log.warning("sysfs: %s is an absolute link to %s; not followed", candidate, target)
                return None
            walk = target.split("/")
            walk.reverse()
            pending += walk
        return resolved

    # ---- reads ----------------------------------------------------------------------------

    def read_text(self, path: Path, limit: int = ATTRIBUTE_LIMIT) -> str | None:
        """Read a text attribute, stripped of surrounding whitespace.

        ``None`` when it is absent, unreadable, longer than *limit* bytes, not UTF-8, or contains
        a NUL byte. The attribute itself is never a link; only its directory is resolved.
        """
        directory = self.resolve(path.parent)
        if directory is None:
            return None
        return self.read_attribute(directory, path.name, limit)

    def read_attribute(
        self, directory: Path | str, name: str, limit: int = ATTRIBUTE_LIMIT
    ) -> str | None:
        """Like :meth:`read_text` for *name* in an already resolved *directory*."""
        directory = os.fspath(directory)
        if "/" in name or name in ("", ".", "..") or not self._inside(directory):
            return None
        real = directory + "/" + name
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            log.debug("sysfs: %s vanished", real)
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                log.warning("sysfs: %s is a link, not an attribute; ignored", real)
            else:
                log.warning("sysfs: cannot open %s: %s", real, err.strerror)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                log.warning("sysfs: %s is not a regular file; ignored", real)
                return None
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                chunk = os.read(fd, limit + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as err:
            if err.errno in (errno.ENODEV, errno.ENOENT):
                log.debug("sysfs: %s vanished while read", real)
            else:
                log.warning("sysfs: cannot read %s: %s", real, err.strerror)
            return None
        finally:
            os.close(fd)
        return decode_attribute(b"".join(chunks), limit, real)

    def read_int(self, path: Path, base: int = 10) -> int | None:
        """Read an integer attribute (``0x``-prefixed when *base* is 16); ``None`` if malformed."""
        text = self.read_text(path)
        if text is None:
            return None
        return parse_int(text, base, path)

    def link_name(self, path: Path) -> str | None:
        """The last component of the target of the link *path*, if it resolves inside the root."""
        real = self.resolve(path)
        return real.name if real is not None else None

    def is_dir(self, path: Path) -> bool:
        """Tell whether *path* resolves, inside the root, to a directory."""
        real = self.resolve(path)
        return real is not None and os.path.isdir(real)

    def exists(self, path: Path) -> bool:
        """Tell whether *path* resolves inside the root to something that exists."""
        real = self.resolve(path)
        return real is not None and os.path.lexists(real)

    def list_dir(self, path: Path) -> list[str]:
        """Sorted entry names of a directory; empty when it is absent, unreadable or too large."""
        real = self.resolve(path)
        if real is None:
            return []
        names: list[str] = []
        try:
            with os.scandir(real) as entries:
                for entry in entries:
                    names.append(entry.name)
                    if len(names) > DIRECTORY_LIMIT:
                        log.warning("sysfs: %s has too many entries; ignored", path)
                        return []
        except FileNotFoundError:
            log.debug("sysfs: %s vanished", path)
            return []
        except OSError as err:
            log.warning("sysfs: cannot list %s: %s", path, err.strerror)
            return []
        return sorted(names)


def decode_attribute(data: bytes, limit: int, where: Path | str) -> str | None:
    """Turn raw attribute bytes into stripped text, or ``None`` (logged) if they are unusable."""
    if len(data) > limit:
        log.warning("sysfs: %s is longer than %d bytes; ignored", where, limit)
        return None
    if b"\0" in data:
        log.warning("sysfs: %s contains a NUL byte; ignored", where)
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        log.warning("sysfs: %s is not UTF-8; ignored", where)
        return None


_DIGITS = {10: frozenset("0123456789"), 16: frozenset("0123456789abcdefABCDEF")}


def parse_int(text: str, base: int, where: Path) -> int | None:
    """Parse a plain sysfs integer (decimal, or hex with an optional ``0x``); ``None`` if not."""
    digits = text[2:] if base == 16 and text[:2].lower() == "0x" else text
    if not digits or len(digits) > 20 or not set(digits) <= _DIGITS[base]:
        log.warning("sysfs: %s holds %r, not a base-%d integer; ignored", where, text[:64], base)
        return None
    return int(digits, base)
