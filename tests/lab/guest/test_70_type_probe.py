"""A type nobody instantiated is probed through a temporary instance, which is then removed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import Daemon, MdevLab

DROP_IN = Path("/run/systemd/system/vfiocapsd.service.d/50-probe-types.conf")


@pytest.fixture(scope="module")
def writable_sysfs(daemon: Daemon) -> Iterator[None]:
    """The drop-in the README documents for creating instances: sysfs devices writable (one
    daemon restart with it for every type of this module, one without it after)."""
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text("[Service]\nReadWritePaths=/sys/devices\n")
    subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60)
    daemon.restart()
    try:
        yield
    finally:
        DROP_IN.unlink()
        subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60)
        daemon.restart()


@pytest.mark.parametrize(
    ("module", "type_id", "display", "gl"),
    [("mdpy", "mdpy-xga", "region", False), ("mbochs", "mbochs-large", "dmabuf", True)],
)
def test_probe_type_uses_a_temporary_instance(
    daemon: Daemon,
    mdevs: MdevLab,
    writable_sysfs: None,
    module: str,
    type_id: str,
    display: str,
    gl: bool,
) -> None:
    before = set(mdevs.instances_of(module))
    answer = dict(daemon.manager("ProbeType", "ss", module, type_id))
    assert answer["Probed"] is True
    assert answer["Display"] == display
    assert answer["GlRequired"] is gl
    assert answer["Migration"] == "unsupported"
    assert set(mdevs.instances_of(module)) == before, "the temporary instance must be removed"
    listed = {(t["Parent"], t["TypeId"]): t for t in daemon.manager("ListTypes")}
    assert listed[(module, type_id)]["Probed"] is True
