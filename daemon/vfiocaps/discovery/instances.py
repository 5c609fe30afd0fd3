"""Creating and removing mdev instances through sysfs, for probing types nobody instantiated."""

from __future__ import annotations

import logging
import os
import re
import uuid as uuidlib
from pathlib import Path

from ..errors import DiscoveryError
from ..model import Device, DeviceKind, Parent
from .sysfs import SysfsTree

log = logging.getLogger(__name__)

_TYPE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")


class InstanceError(DiscoveryError):
    """An mdev instance could not be created or removed."""


def _write_attribute(tree: SysfsTree, path: Path, value: str) -> None:
    """Write *value* to an existing sysfs attribute inside *tree* (never creating files).

    Raises:
        InstanceError: the attribute is missing, outside the tree, or the kernel refused.
    """
    resolved = tree.resolve(path)
    if resolved is None:
        raise InstanceError(f"{path} is missing or outside {tree.root}")
    try:
        fd = os.open(resolved, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        raise InstanceError(f"cannot open {resolved}: {err.strerror}") from err
    try:
        os.write(fd, value.encode())
    except OSError as err:
        raise InstanceError(f"writing {resolved} failed: {err.strerror}") from err
    finally:
        os.close(fd)


def create_instance(sysfs_root: Path, parent: Parent, type_id: str) -> str:
    """Create an instance of *type_id* on *parent* (``echo UUID > .../create``); return the UUID.

    Raises:
        InstanceError: the type id is malformed, the type is missing, or the kernel refused.
    """
    if not _TYPE_ID.match(type_id):
        raise InstanceError(f"not an mdev type id: {type_id[:80]!r}")
    tree = SysfsTree(sysfs_root)
    create = parent.sysfs_path / "mdev_supported_types" / type_id / "create"
    new = str(uuidlib.uuid4())
    _write_attribute(tree, create, new)
    log.info("created temporary instance %s of %s on %s", new, type_id, parent.name)
    return new


def remove_instance(sysfs_root: Path, device: Device) -> None:
    """Remove an mdev instance (``echo 1 > .../remove``).

    Raises:
        InstanceError: *device* is not an mdev, or the kernel refused (the device is in use).
    """
    if device.kind is not DeviceKind.MDEV:
        raise InstanceError(f"{device.device_id} is not an mdev instance")
    _write_attribute(SysfsTree(sysfs_root), Path(device.sysfs_path) / "remove", "1")
    log.info("removed temporary instance %s", device.device_id)
