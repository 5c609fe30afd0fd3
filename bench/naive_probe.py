"""The naive way to learn capabilities: one QEMU per device and per question, one after another.

This is how a per-device probing script does it: for every device, start QEMU once with
``display=on`` (does it have a display?) and once with ``enable-migration=on`` (can it
migrate?), and read the answer from whether QEMU came up. The launches use vfiocaps' own launch
code (same sandbox, same probe user and groups, same QMP session), so the two ways differ only in
how many launches they make. Run under ``umockdev-wrapper`` as ``python -m bench.naive_probe
SPEC_JSON`` from the checkout; prints one JSON line. The lab benchmark imports :func:`probe_all`.
"""

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from vfiocaps.prober import launch_identity
from vfiocaps.prober.grants import NodeGrants
from vfiocaps.prober.launch import LaunchContext, probe_environment, run_launch
from vfiocaps.prober.observation import Attempt, Step
from vfiocaps.prober.plan import Accel, DeviceSettings, OnOffAuto, machine_for_architecture
from vfiocaps.prober.sandbox import (
    kvm_access,
    private_directory,
    resolve_probe_identity,
)
from vfiocaps.prober.target import ProbeTarget
from vfiocaps.vfiogroup import group_node

QUESTIONS = {
    "display": DeviceSettings(display=OnOffAuto.ON, migration=None),
    "migration": DeviceSettings(display=OnOffAuto.OFF, migration=OnOffAuto.ON),
}


async def probe_all(spec: dict[str, Any]) -> dict[str, Any]:
    """Ask every question of every device in turn; count launches and time them."""
    dev_root = Path(spec["dev_root"])
    identity = resolve_probe_identity(spec["probe_user"], dev_root)
    kvm = kvm_access(dev_root, identity)
    accel = Accel.KVM if kvm.usable else Accel.TCG
    grants = NodeGrants(journal=Path(spec["runtime_dir"]) / "naive-grants", dev_root=dev_root)
    launches: list[float] = []
    answers: dict[str, bool] = {}
    began = time.monotonic()
    with contextlib.ExitStack() as lent:
        identity = launch_identity(identity, kvm, grants, lent)
        for path in spec["devices"]:
            target = ProbeTarget.from_sysfs(Path(path), Path("/sys"))
            node = group_node(dev_root, target.iommu_group or "")
            with contextlib.ExitStack() as stack:
                workdir = stack.enter_context(private_directory(Path(spec["runtime_dir"])))
                if identity.credentials is not None:
                    stack.enter_context(grants.granted(node, identity.uid))
                context = LaunchContext(
                    binary=Path(spec["qemu"]),
                    machine=machine_for_architecture(None),
                    vm_uuid=str(uuid.uuid4()),
                    sysfsdev=target.sysfs_path,
                    identity=identity,
                    workdir=workdir,
                    timeout=spec["timeout"],
                    # The stand-in QEMU reads the same emulated sysfs as this process.
                    environment=probe_environment(
                        (name, os.environ[name])
                        for name in ("UMOCKDEV_DIR", "LD_PRELOAD")
                        if name in os.environ
                    ),
                )
                for question, settings in QUESTIONS.items():
                    observation, record = await run_launch(
                        context, Attempt(Step.DISCOVER, settings, accel)
                    )
                    launches.append(record.duration)
                    answers[f"{target.device_id} {question}"] = observation.started
    return {
        "wall": time.monotonic() - began,
        "accel": accel.value,
        "launches": launches,
        "answers": answers,
    }


if __name__ == "__main__":
    result = asyncio.run(probe_all(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(result) + "\n")
