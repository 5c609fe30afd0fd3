"""The naive way to learn capabilities: one QEMU per device and per question, one after another.

This is how a per-device probing script does it: for every device, start QEMU once with
``display=on`` (does it have a display?) and once with ``enable-migration=on`` (can it
migrate?), and read the answer from whether QEMU came up. The launches use vfiocaps' own launch
code (same sandbox, same probe user and groups, same QMP session), so the two ways differ only in
how many launches they make. Run under ``umockdev-wrapper`` as ``python -m bench.naive_probe
SPEC_JSON`` from the checkout; prints one JSON line. The lab benchmark imports :func:`probe_all`.
"""

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from vfiocaps.config import Config
from vfiocaps.prober import DeviceSettings, OnOffAuto, Prober, ProbeTarget, ask_each, probe_accel

QUESTIONS = {
    "display": DeviceSettings(display=OnOffAuto.ON, migration=None),
    "migration": DeviceSettings(display=OnOffAuto.OFF, migration=OnOffAuto.ON),
}


async def probe_all(spec: dict[str, Any]) -> dict[str, Any]:
    """Ask every question of every device in turn; count launches and time them."""
    runtime_dir = Path(spec["runtime_dir"])
    config = Config(
        qemu_binary=Path(spec["qemu"]),
        dev_root=Path(spec["dev_root"]),
        runtime_dir=runtime_dir,
        cache_dir=runtime_dir / "cache",
        probe_user=spec["probe_user"],
        probe_timeout=spec["timeout"],
        # The stand-in QEMU reads the same emulated sysfs as this process.
        probe_environment=tuple(
            (name, os.environ[name])
            for name in ("UMOCKDEV_DIR", "LD_PRELOAD")
            if name in os.environ
        ),
    )
    prober = Prober(config)
    accel = probe_accel(prober)
    launches: list[float] = []
    answers: dict[str, bool] = {}
    began = time.monotonic()
    for path in spec["devices"]:
        target = ProbeTarget.from_sysfs(Path(path), Path("/sys"))
        replies = await ask_each(prober, target, list(QUESTIONS.values()), accel)
        for question, reply in zip(QUESTIONS, replies, strict=True):
            launches.append(reply.seconds)
            answers[f"{target.device_id} {question}"] = reply.started
    return {
        "wall": time.monotonic() - began,
        "accel": accel.value,
        "launches": launches,
        "answers": answers,
    }


if __name__ == "__main__":
    result = asyncio.run(probe_all(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(result) + "\n")
