"""The host's GL answer on the bus and in vfiocapsctl: a daemon probing through the fake QEMU."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

from support.daemon_lab import Lab, capabilities, manager_call
from support.gl_host import add_render_node

MANAGER = "org.vfiocaps1.Manager"


def show(lab: Lab, device: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vfiocaps.ctl", "--bus-address", lab.bus.address, "show", device],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_gl_set_up_then_crashed_on_a_used_instance_published_and_shown(lab: Lab) -> None:
    node = add_render_node(lab.dev)
    before = os.stat(node)
    lab.host.build("samples")
    daemon = lab.start()
    mbochs = lab.host.add_instance("mbochs", "mbochs-small")
    mdpy = lab.host.add_instance("mdpy", "mdpy-vga")
    lab.wait_states({mbochs: "done", mdpy: "done"})

    props = lab.devices()[mbochs]
    assert (props["Display"], props["GlRequired"]) == ("dmabuf", True)
    assert props["GlHost"] == "set-up"
    assert props["GlRenderNode"] == str(node)
    assert props["GlDetail"].startswith(f"GL display set up on {node}")
    assert props["DisplaySize"] == "640x480"
    assert lab.devices()[mdpy]["DisplaySize"] == ""
    assert (lab.devices()[mdpy]["GlHost"], lab.devices()[mdpy]["GlDetail"]) == ("not-needed", "")
    answer = capabilities(lab.bus, mbochs)
    assert (answer["GlHost"], answer["GlRenderNode"]) == ("set-up", str(node))
    assert answer["DisplaySize"] == "640x480"
    types = {t["TypeId"]["data"]: t for t in manager_call(lab.bus, "ListTypes")[0]}
    assert types["mbochs-small"]["GlHost"]["data"] == "set-up"
    parts = manager_call(lab.bus, "DomainXmlParts", "ss", mbochs, "remote")[0]
    assert f"rendernode='{node}'" in parts["graphics"]
    assert "OpenGL on this host: set-up" in parts["notes"]
    text = show(lab, mbochs)
    assert f"GL on host  set-up on {node}: the GL display was set up" in text
    assert "a guest's frames are not proven" in text
    assert re.search(r"^  display size +640x480$", text, re.MULTILINE), text

    # A guest has set a mode on the instance since: the GL path crashes, the rest stands.
    lab.overrides({"devices": {mbochs: {"mode_set": True}}})
    fresh = {k: v["data"] for k, v in manager_call(lab.bus, "Refresh", "s", mbochs)[0].items()}
    assert fresh["ProbeState"] == "done"
    assert (fresh["Display"], fresh["Migration"]) == ("dmabuf", "unsupported")
    assert fresh["GlHost"] == "crashed"
    assert fresh["DisplaySize"] == ""
    assert "GL path crashed" in fresh["GlDetail"]
    assert "SIGSEGV" in fresh["GlDetail"]
    assert fresh["LastError"] == ""
    assert "GL on host  crashed on" in show(lab, mbochs)
    after = os.stat(node)
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        before.st_uid,
        before.st_gid,
        stat.S_IMODE(before.st_mode),
    )
    assert "Traceback" not in daemon.log()
