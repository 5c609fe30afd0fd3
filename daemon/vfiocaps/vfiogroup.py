"""VFIO group nodes: where a group's node lies, and whether another process (a VM) holds it."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def group_node(dev_root: Path, iommu_group: str) -> Path:
    """The VFIO group node of *iommu_group* under *dev_root*."""
    return dev_root / "vfio" / iommu_group


def held_elsewhere(node: Path) -> bool:
    """Whether the VFIO group *node* is open in another process, without disturbing it.

    A VFIO group can be open only once: a second open fails with EBUSY and has no effect on
    the holder. When nobody holds it our open succeeds and is closed at once, untouched.

    Raises:
        OSError: the node is missing or cannot be opened for another reason.
    """
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        if err.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False
