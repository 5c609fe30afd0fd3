"""The prober in a process under umockdev-wrapper: the fake QEMU sees the same emulated sysfs.

This is how the engine's tests run the daemon. The test runs this file as a script under
``umockdev-wrapper``; the script builds the kernel samples' host in a testbed, creates one
instance of each sample, probes them with the fake QEMU and prints the reports as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev-wrapper is not installed"
)

EXPECTED = {
    "mtty": ("none", False, "unsupported"),  # with defaults; supported with its options
    "mdpy": ("region", False, "unsupported"),
    "mbochs": ("dmabuf", True, "unsupported"),
}


def test_samples_through_umockdev() -> None:
    result = subprocess.run(
        ["umockdev-wrapper", sys.executable, str(Path(__file__))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=HERE.parent,
    )
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout.splitlines()[-1])
    for module, (display, gl, migration) in EXPECTED.items():
        report = reports[module]
        assert report["outcome"] == "ok", report
        assert report["display"] == display
        assert report["gl_required"] is gl
        assert report["migration"] == migration
        assert report["leftovers"] == []


async def _probe_samples() -> dict[str, Any]:
    import gi

    gi.require_version("UMockdev", "1.0")
    from gi.repository import UMockdev

    from support.prober import (
        ensure_probe_user,
        install_fake_qemu,
        leftovers,
        make_group_node,
        make_readable,
    )
    from support.umockdev_hosts import HostBuilder
    from vfiocaps.config import Config
    from vfiocaps.prober import Prober, ProbeTarget

    testbed = UMockdev.Testbed.new()
    builder = HostBuilder(testbed)
    builder.build("samples")
    types = {"mtty": "mtty-1", "mdpy": "mdpy-vga", "mbochs": "mbochs-small"}
    uuids = {module: builder.add_instance(module, type_id) for module, type_id in types.items()}
    root = Path(testbed.get_root_dir())
    # The daemon learns the testbed from its environment; a QEMU running as the probe user
    # needs to read it.
    os.environ["UMOCKDEV_DIR"] = str(root)
    make_readable(root)
    scratch = Path(tempfile.mkdtemp(prefix="vfiocaps-prober-umockdev-"))
    try:
        scratch.chmod(0o755)
        qemu = install_fake_qemu(scratch / "qemu")
        dev = scratch / "dev"
        for group in range(len(uuids)):
            make_group_node(dev / "vfio" / str(group))
        config = Config(
            runtime_dir=scratch / "run",
            dev_root=dev,
            qemu_binary=qemu,
            probe_user=ensure_probe_user(),
            probe_environment=tuple(
                (name, os.environ[name]) for name in ("UMOCKDEV_DIR", "LD_PRELOAD")
            ),
        )
        prober = Prober(config)
        results: dict[str, Any] = {}
        for module, uuid in uuids.items():
            target = ProbeTarget.from_sysfs(Path("/sys/bus/mdev/devices") / uuid)
            report = await prober.probe(target)
            caps = report.capabilities
            results[module] = {
                "outcome": report.outcome.value,
                "error": report.error,
                "display": caps.display.value if caps else None,
                "gl_required": caps.gl_required if caps else None,
                "migration": caps.migration.value if caps else None,
                "leftovers": [str(p) for p in leftovers(scratch / "run")],
            }
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(json.dumps(asyncio.run(_probe_samples())))
