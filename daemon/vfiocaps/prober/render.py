"""Whether the probe user can reach a DRM render node, and through which group (like /dev/kvm)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..drm import render_nodes
from .sandbox import DeviceNodes, ProbeIdentity, launch_group_refusal

NOT_ACCESSIBLE = "render node not accessible to the probe user"
# The groups udev gives render nodes (systemd: render; older rules: video).
RENDER_GROUPS = frozenset({"render"})


@dataclass(frozen=True)
class RenderAccess:
    """The render node a GL probe uses, and how QEMU reaches it.

    ``node`` is ``None`` when the host has none. A node that is not ``usable`` is never
    granted: ``reason`` says why it cannot be used.
    """

    node: Path | None
    usable: bool
    group: int | None = None  # give QEMU this supplementary group for the GL launch
    reason: str = ""


def render_access(
    dev_root: Path, identity: ProbeIdentity, scanned: DeviceNodes | None = None
) -> RenderAccess:
    """The first render node under *dev_root* the probe user can open read-write.

    A node is a character device (a link or another file is refused). It is reachable when
    the probe user owns it, when it is world read-write, or (when vfiocapsd switches users)
    through its group when that group is read-write and passes the probe user's group policy
    for a launch (:func:`vfiocaps.prober.sandbox.launch_group_refusal`: Debian's ``render``,
    owning nothing but render nodes; never ``root``, ``disk``, ``video`` and the like; Debian:
    ``root:render 0660``). *scanned*: see :func:`~vfiocaps.prober.sandbox.launch_group_refusal`.
    Raises nothing; the answer says why not.
    """
    nodes = render_nodes(dev_root)
    if not nodes:
        return RenderAccess(None, False, reason=f"no DRM render node in {dev_root / 'dri'}")
    refusals = []
    for node in nodes:
        access = _node_access(node, identity, dev_root, set(nodes), scanned)
        if access.usable:
            return access
        refusals.append(access)
    return refusals[0]


def _node_access(
    node: Path,
    identity: ProbeIdentity,
    dev_root: Path,
    render: set[Path],
    scanned: DeviceNodes | None,
) -> RenderAccess:
    try:
        st = os.lstat(node)  # never through a link: the node's own group is what QEMU gets
    except OSError as err:
        return RenderAccess(node, False, reason=f"{node}: {err.strerror}")
    if not stat.S_ISCHR(st.st_mode):
        return RenderAccess(node, False, reason=f"{node} is not a character device")
    mode = stat.S_IMODE(st.st_mode)
    found = f"{node} is uid {st.st_uid}, gid {st.st_gid}, mode {mode:04o}"
    if identity.credentials is None:
        if os.access(node, os.R_OK | os.W_OK):
            return RenderAccess(node, True)
        return RenderAccess(node, False, reason=f"{NOT_ACCESSIBLE} ({found})")
    if st.st_uid == identity.uid or mode & 0o006 == 0o006:
        return RenderAccess(node, True)
    if mode & 0o060 == 0o060:
        refusal = launch_group_refusal(st.st_gid, dev_root, RENDER_GROUPS, render, scanned)
        if not refusal:
            return RenderAccess(node, True, group=st.st_gid)
        return RenderAccess(
            node,
            False,
            reason=f"{NOT_ACCESSIBLE} ({found}: {refusal}, and QEMU is given no such group; "
            "vfiocapsd does not change it: give render nodes a group of their own, as udev's "
            "render group)",
        )
    return RenderAccess(
        node,
        False,
        reason=f"{NOT_ACCESSIBLE} ({found}: neither group read-write with a group other than "
        "root's nor world read-write; vfiocapsd does not change it)",
    )
