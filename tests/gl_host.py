"""Render nodes for emulated hosts: ``dri/renderD128`` under a dev root, as udev makes it."""

from __future__ import annotations

import grp
import os
from pathlib import Path

RENDER_GROUP = "render"


def render_gid() -> int:
    """The host's ``render`` group (Debian creates it with udev)."""
    return grp.getgrnam(RENDER_GROUP).gr_gid


def add_render_node(
    dev: Path, name: str = "renderD128", gid: int | None = None, mode: int = 0o660
) -> Path:
    """Create ``<dev>/dri/<name>`` as udev leaves a render node: ``root:render 0660``.

    A regular file stands in for the character device: what the prober decides from is its
    owner, group and mode, and the fake QEMU opens it read-write as the probe user.
    """
    node = dev / "dri" / name
    node.parent.mkdir(parents=True, exist_ok=True)
    node.parent.chmod(0o755)
    node.write_text("")
    os.chown(node, 0, render_gid() if gid is None else gid)
    node.chmod(mode)
    return node
