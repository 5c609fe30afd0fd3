"""Render nodes for emulated hosts: ``dri/renderD128`` under a dev root, as udev makes it."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

RENDER_GROUP = "render"


def render_gid() -> int:
    """The host's ``render`` group (Debian creates it with udev)."""
    return grp.getgrnam(RENDER_GROUP).gr_gid


def add_render_node(
    dev: Path, name: str = "renderD128", gid: int | None = None, mode: int = 0o660
) -> Path:
    """Create ``<dev>/dri/<name>`` as udev leaves a render node: ``root:render 0660``.

    A character device with ``/dev/null``'s numbers stands in for the DRM node: the prober
    decides from its type, owner, group and mode, and the fake QEMU opens it read-write as the
    probe user, which needs no GPU.
    """
    node = dev / "dri" / name
    node.parent.mkdir(parents=True, exist_ok=True)
    node.parent.chmod(0o755)
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.chown(node, 0, render_gid() if gid is None else gid)
    node.chmod(mode)
    return node
