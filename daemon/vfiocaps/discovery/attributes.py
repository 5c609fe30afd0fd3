"""The one writer of sysfs attributes (create, remove, a vGPU profile): one rule for all."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import DiscoveryError
from .sysfs import SysfsTree


class AttributeWriteError(DiscoveryError):
    """A sysfs attribute could not be written: it is missing, a link, read-only to the daemon,
    or the kernel refused the value (:attr:`refused`, with the kernel's :attr:`errno`)."""

    def __init__(self, message: str, path: Path, code: int = 0, *, refused: bool = False):
        super().__init__(message)
        self.path = path
        self.errno = code
        self.refused = refused


def open_problem(err: OSError) -> str:
    """What an attribute that cannot be opened means, with what to do where one can."""
    if err.errno == errno.EROFS:
        return (
            "sysfs is read-only to vfiocapsd; writing it (a temporary instance, a vGPU profile "
            "for a probe) needs ReadWritePaths=/sys/devices in its service (see "
            "vfiocapsd.service)"
        )
    if err.errno == errno.ELOOP:
        return "it is a link, not an attribute"
    if err.errno == errno.ENOENT:
        return "it does not exist"
    return err.strerror or str(err)


def write_failure(attribute: Path, value: str, err: OSError) -> str:
    """How the kernel's refusal *err* of *value* written to *attribute* is told: the file, the
    value and the errno's name."""
    code = err.errno or 0
    name = errno.errorcode.get(code, str(code))
    return f"writing {value} to {attribute} failed with {name} ({err.strerror})"


def write_attribute(tree: SysfsTree, attribute: Path, value: str) -> None:
    """Write *value* to the existing attribute *attribute* as ``echo value > attribute`` does:
    its directory is resolved inside *tree* (a link leading out is refused), the attribute
    itself is opened without following a link and never created (truncated: an emulated tree
    holds plain files), and *value* is written in one ``write``.

    Raises:
        AttributeWriteError: the attribute is missing, outside the tree, a link or read-only
            (``refused`` false), or the kernel refused *value* (``refused`` true, its errno).
    """
    name = attribute.name
    directory = tree.resolve(attribute.parent)
    if directory is None or name in ("", ".", ".."):
        raise AttributeWriteError(
            f"{attribute.parent} is missing or outside {tree.root}", attribute, errno.ENOENT
        )
    real = directory / name
    try:
        fd = os.open(real, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        raise AttributeWriteError(
            f"cannot open {real}: {open_problem(err)}", real, err.errno or 0
        ) from err
    try:
        os.write(fd, value.encode())
    except OSError as err:
        raise AttributeWriteError(
            write_failure(real, value, err), real, err.errno or 0, refused=True
        ) from err
    finally:
        os.close(fd)
