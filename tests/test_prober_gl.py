"""The GL check of a dma-buf display, by the real prober against the fake QEMU (real QMP)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from support.gl_host import add_render_node, render_gid
from support.prober import (
    REAL_QEMU,
    FakeHost,
    fake_host,
    fake_qemu_config,
    leftovers,
    node_state,
    probe_user,
    scratch,
)
from vfiocaps.capabilities import Display, GlHost, Migration, ProbeOutcome, ProbeReport
from vfiocaps.prober import Prober, ProbeTarget
from vfiocaps.prober.gldisplay import take_screendump
from vfiocaps.prober.render import NOT_ACCESSIBLE, render_access
from vfiocaps.prober.sandbox import ProbeIdentity
from vfiocaps.process import Credentials

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

MBOCHS = "11111111-2222-4333-8444-0000000000b1"
MDPY = "11111111-2222-4333-8444-0000000000b2"
AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="the group grant needs a probe user")


async def probe(
    scratch: Path,
    host: FakeHost,
    probe_user: str,
    device: Path,
    overrides: dict[str, Any] | None = None,
    node_mode: int | None = 0o660,
) -> tuple[ProbeReport, list[list[str]]]:
    """Probe *device* with a render node of mode *node_mode* (``None``: no node)."""
    argv_log = scratch / "argv.log"
    config = fake_qemu_config(
        scratch, host, probe_user, {**(overrides or {}), "argv_log": str(argv_log)}
    )
    argv_log.touch(mode=0o666)
    argv_log.chmod(0o666)
    if node_mode is not None:  # after the tree was made readable: the node keeps its mode
        add_render_node(host.dev, mode=node_mode)
    before = node_state(host.dev / "dri" / "renderD128") if node_mode is not None else None
    report = await Prober(config).probe(ProbeTarget.from_sysfs(device, host.sysfs))
    assert leftovers(scratch / "run") == []
    if before is not None:  # the node's owner, group and mode are never changed
        assert node_state(host.dev / "dri" / "renderD128") == before
    launches = [json.loads(line) for line in argv_log.read_text().splitlines()]
    return report, [argv for argv in launches if "-device" in argv and "help" not in argv[-1]]


def mbochs(host: FakeHost) -> Path:
    return host.add_mdev(MBOCHS, "mbochs-small", "mbochs", "2", parent="mbochs")


def display_args(argv: list[str]) -> str:
    return argv[argv.index("-display") + 1]


def device_arg(argv: list[str]) -> str:
    return argv[argv.index("-device") + 1]


@needs_root
async def test_a_render_node_reachable_through_its_group_sets_the_gl_display_up(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    report, launches = await probe(scratch, fake_host, probe_user, mbochs(fake_host))
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    node = fake_host.dev / "dri" / "renderD128"
    assert (caps.display, caps.gl_required, caps.migration) == (
        Display.DMABUF,
        True,
        Migration.UNSUPPORTED,
    )
    assert caps.gl_host is GlHost.SET_UP, caps.gl_detail
    assert caps.gl_render_node == str(node)
    assert f"GL display set up on {node}" in caps.gl_detail
    assert "console[0] is linked to it" in caps.gl_detail
    assert "screendump answered with a 640x480 image" in caps.gl_detail
    assert "software rendering" in caps.gl_detail  # the limit is stated
    assert [launch.purpose for launch in report.launches] == ["discover", "display-off", "gl"]
    gl = launches[-1]
    assert display_args(gl) == f"egl-headless,rendernode={node}"
    assert "display=on" in device_arg(gl)
    assert all(display_args(argv) == "none" for argv in launches[:-1])
    # The probe user is not in the render group: QEMU opened the node through the group
    # given to the GL launch alone.
    user = pwd.getpwnam(probe_user)
    assert user.pw_gid != render_gid()
    assert probe_user not in grp.getgrgid(render_gid()).gr_mem


@needs_root
async def test_a_guest_mode_left_on_the_instance_crashes_the_gl_path_only(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    overrides = {"devices": {MBOCHS: {"mode_set": True}}}
    report, _ = await probe(scratch, fake_host, probe_user, mbochs(fake_host), overrides)
    assert report.outcome is ProbeOutcome.OK, report  # not a device failure
    caps = report.capabilities
    assert caps is not None
    assert (caps.display, caps.gl_required, caps.migration) == (
        Display.DMABUF,
        True,
        Migration.UNSUPPORTED,
    )
    assert caps.migration_blockers  # the device's other answers stay
    assert caps.gl_host is GlHost.CRASHED
    assert caps.gl_detail.startswith("GL path crashed: QEMU with -display egl-headless")
    assert "SIGSEGV" in caps.gl_detail
    assert "freshly created instance" in caps.gl_detail
    assert len(report.launches) == 3
    assert report.launches[-1].exit_status == -11


async def test_without_a_render_node_there_is_no_gl_launch(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    report, launches = await probe(
        scratch, fake_host, probe_user, mbochs(fake_host), node_mode=None
    )
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert caps.gl_host is GlHost.NO_RENDER_NODE
    assert caps.gl_render_node == ""
    assert f"no DRM render node in {fake_host.dev / 'dri'}" in caps.gl_detail
    assert [launch.purpose for launch in report.launches] == ["discover", "display-off"]
    assert len(launches) == 2


@needs_root
async def test_a_node_closed_to_its_group_is_reported_and_never_granted(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    report, launches = await probe(
        scratch, fake_host, probe_user, mbochs(fake_host), node_mode=0o600
    )
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert caps.gl_host is GlHost.INACCESSIBLE
    assert caps.gl_detail.startswith("render node not accessible to the probe user")
    assert "mode 0600" in caps.gl_detail
    assert len(launches) == 2  # no GL launch


async def test_a_region_display_needs_no_gl_launch(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(MDPY, "mdpy-vga", "mdpy", "1", parent="mdpy")
    report, launches = await probe(scratch, fake_host, probe_user, device)
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert (caps.display, caps.gl_host) == (Display.REGION, GlHost.NOT_NEEDED)
    assert len(launches) == 1


async def test_a_busy_device_is_never_given_a_gl_launch(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    overrides = {"devices": {MBOCHS: {"busy": True}}}
    report, launches = await probe(scratch, fake_host, probe_user, mbochs(fake_host), overrides)
    assert report.outcome is ProbeOutcome.BUSY
    assert len(launches) == 1
    assert all("egl-headless" not in display_args(argv) for argv in launches)


def test_render_access_refuses_links_and_other_files(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    real = add_render_node(dev, name="renderD200")
    (dev / "dri" / "renderD128").symlink_to(real)
    (dev / "dri" / "renderD129").write_text("")
    root_identity = ProbeIdentity(Credentials(4242, 4242, (4242,)), "QEMU runs as uid 4242")
    access = render_access(dev, root_identity)
    # The first node is a link and the second a plain file: the third, a device, is used.
    assert (access.node, access.usable, access.group) == (real, True, render_gid())
    real.unlink()
    access = render_access(dev, root_identity)
    assert (access.node, access.usable) == (dev / "dri" / "renderD128", False)
    assert "not a character device" in access.reason


def test_render_access_gives_no_group_that_is_roots(tmp_path: Path) -> None:
    node = add_render_node(tmp_path, gid=0)
    access = render_access(tmp_path, ProbeIdentity(Credentials(4242, 4242, (4242,)), "u"))
    assert (access.node, access.usable, access.group) == (node, False, None)
    assert access.reason.startswith(NOT_ACCESSIBLE)


def test_render_access_gives_no_group_the_probe_users_policy_refuses(tmp_path: Path) -> None:
    """A render node left ``root:disk 0660`` (or video, or a group that owns other devices
    too) is not reached through its group: QEMU would get that group for the GL launch."""
    identity = ProbeIdentity(Credentials(4242, 4242, (4242,)), "u")
    disk = grp.getgrnam("disk").gr_gid
    node = add_render_node(tmp_path / "a", gid=disk)
    access = render_access(tmp_path / "a", identity)
    assert (access.node, access.usable, access.group) == (node, False, None)
    assert access.reason.startswith(NOT_ACCESSIBLE)
    assert "its group disk gives access to devices or files of value" in access.reason
    video = add_render_node(tmp_path / "b", gid=grp.getgrnam("video").gr_gid)
    assert (render_access(tmp_path / "b", identity).usable, video.exists()) == (False, True)
    # The render group, owning one more node than the render nodes: refused, that node named.
    node = add_render_node(tmp_path / "c")
    other = tmp_path / "c" / "sda"
    os.mknod(other, stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.chown(other, 0, render_gid())
    access = render_access(tmp_path / "c", identity)
    assert (access.usable, access.group) == (False, None)
    assert f"also owns {other}" in access.reason
    other.unlink()
    assert render_access(tmp_path / "c", identity).group == render_gid()


@pytest.mark.skipif(REAL_QEMU is None, reason="needs qemu-system-x86_64")
async def test_the_screendump_reaches_real_qemu_through_an_fd_set(tmp_path: Path) -> None:
    """QEMU (here without a vfio device: a VGA card has a console too) writes the image into
    the file passed with add-fd, as it must for the GL launch; an unknown device is refused."""
    assert REAL_QEMU is not None
    ours, theirs = socket.socketpair()
    process = await asyncio.create_subprocess_exec(
        REAL_QEMU, "-S", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35,accel=tcg", "-device", "VGA,id=vga",
        "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
        pass_fds=(theirs.fileno(),), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    theirs.close()
    client = QMPClient("screendump-test")
    try:
        await client.connect(ours)
        shot = await take_screendump(client, tmp_path, "vga")
        refused = await take_screendump(client, tmp_path, "nothing-here")
        await client.execute("quit")
    finally:
        with contextlib.suppress(EOFError):  # QEMU may close the socket first as it quits
            await client.disconnect()
        ours.close()
        await process.wait()
    assert (shot.answered, shot.width, shot.height) == (True, 640, 480)
    assert (refused.answered, refused.error) == (
        False,
        "screendump: Device 'nothing-here' not found",
    )
    assert list(tmp_path.iterdir()) == []  # the image file is gone
