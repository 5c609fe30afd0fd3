"""OpenGL for a dma-buf display where the host can give it: with vgem's render node, the daemon sets
the GL display up on fresh mbochs instances (leaving the node as it found it), and libvirt starts
an mbochs VM with the daemon's graphics part. Runs last: until here the host has no render node.

No guest ever sets a mode on the instances used here (mbochs keeps a mode across QEMU runs, and
Mesa's software path then crashes QEMU's GL display)."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from labkit import CapabilityTable, Daemon, MdevLab, vfiocapsctl, wait_for
from libvirtkit import DOMAIN_PREFIX, Libvirt, domain, parts_from_named

RENDER_NODE = Path("/dev/dri/renderD128")
WORKDIR = Path("/var/tmp/vfiocaps-lab-libvirt")


def node_identity(node: Path) -> tuple[int, int, int, int]:
    """Owner, group, mode and device number of a node."""
    st = os.lstat(node)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_rdev


@pytest.fixture(scope="module")
def render_node(daemon: Daemon) -> Path:
    """vgem's render node, with the daemon restarted so that its private /dev shows it."""
    assert not RENDER_NODE.exists(), "the guest had a render node before the GL test"
    subprocess.run(["modprobe", "vgem"], check=True, timeout=60)
    wait_for(RENDER_NODE.exists, 30, f"{RENDER_NODE} from vgem")
    assert stat.S_ISCHR(os.lstat(RENDER_NODE).st_mode)
    # The unit binds /dev/dri into the daemon's /dev at start; a node that appears later needs
    # a restart, as the unit says.
    daemon.restart()
    return RENDER_NODE


@pytest.fixture(scope="module")
def fresh_mbochs(mdevs: MdevLab) -> str:
    """An mbochs-small instance created for this test: no guest has ever set a mode on it."""
    return mdevs.create("mbochs", "mbochs-small")


def test_gl_set_up_on_fresh_instances(
    daemon: Daemon,
    mdevs: MdevLab,
    render_node: Path,
    fresh_mbochs: str,
    table: CapabilityTable,
) -> None:
    before = node_identity(render_node)
    daemon.wait_settled(fresh_mbochs)
    instances = mdevs.instances_of("mbochs")
    probed_at = {
        mdev_uuid: (daemon.device_by_uuid(mdev_uuid) or ("", {}))[1].get("ProbedAt", 0)
        for mdev_uuid in instances
    }
    started = time.monotonic()
    dropped = subprocess.run(
        [vfiocapsctl(), "invalidate", "mbochs"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dropped.returncode == 0, dropped

    def reprobed() -> dict[str, dict[str, object]] | None:
        answers = {}
        for mdev_uuid in instances:
            found = daemon.device_by_uuid(mdev_uuid)
            if found is None:
                return None
            props = found[1]
            if props.get("ProbeState") != "done" or props["ProbedAt"] <= probed_at[mdev_uuid]:
                return None
            answers[mdev_uuid] = props
        return answers

    answers = wait_for(reprobed, 300, "every mbochs instance to be probed again", 1.0)
    seconds = time.monotonic() - started
    for mdev_uuid, props in answers.items():
        where = f"{mdev_uuid} ({props['TypeId']})"
        assert props["Display"] == "dmabuf", where
        assert props["GlRequired"] is True, where
        assert props["GlHost"] == "set-up", f"{where}: {props['GlHost']}: {props['GlDetail']}"
        assert props["GlRenderNode"] == str(render_node), where
        assert str(props["GlDetail"]).startswith(f"GL display set up on {render_node}"), props
        table.record(
            str(props["TypeId"]),
            gl_host=f"no-render-node; with vgem: set-up on {props['GlRenderNode']}",
            gl_detail=props["GlDetail"],
            gl_reprobe_seconds=round(seconds, 1),
        )
    assert node_identity(render_node) == before, "the probe changed the render node"


def test_libvirt_starts_mbochs_with_the_daemons_graphics(
    daemon: Daemon, libvirt: Libvirt, render_node: Path, fresh_mbochs: str
) -> None:
    props = daemon.wait_settled(fresh_mbochs)
    assert props["GlHost"] == "set-up", props
    named = dict(daemon.manager("DomainXmlParts", "ss", fresh_mbochs, "remote"))
    assert "<graphics type='egl-headless'>" in named["graphics"], named
    assert f"rendernode='{render_node}'" in named["graphics"], named
    parts = parts_from_named(named)
    name = f"{DOMAIN_PREFIX}mbochs-gl"
    WORKDIR.mkdir(parents=True, exist_ok=True)
    xml_file = WORKDIR / f"{name}.xml"
    xml_file.write_text(domain(name, parts))
    try:
        valid = libvirt.run(
            "virt-xml-validate", str(xml_file), "domain", check="mbochs GL: validate"
        )
        assert valid.ok, f"{valid.output}\n{xml_file.read_text()}"
        assert libvirt.virsh("define", str(xml_file), check="mbochs GL: define").ok
        start = libvirt.virsh("start", name, check="mbochs GL: start (egl-headless)")
        assert start.ok, f"{start.output}\n{xml_file.read_text()}"
        assert libvirt.state(name) == "running"
    finally:
        libvirt.remove(name)
