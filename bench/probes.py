"""Probe cost: launches and wall time of vfiocapsd against the naive per-device way, and one
probe QEMU against a bare QEMU start-QMP-quit with the real ``qemu-system-x86_64``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PROBE_LOG_LINE, REPO, Progress, summary
from bench.qemu_floor import Stages, bare_qemu, self_test_accel
from support.daemon_lab import Lab, make_lab, manager_property
from support.harness import wait_until
from support.prober import REAL_QEMU, ensure_probe_user
from support.umockdev_hosts import PARENTS
from vfiocaps.config import DEFAULT_PROBE_USER, Config
from vfiocaps.prober import (
    Accel,
    DeviceSettings,
    LaunchEvent,
    LaunchStage,
    OnOffAuto,
    Prober,
    launch_credentials,
    round_trip,
)

DEVICES_PER_TYPE = 4
REAL_QEMU_REPEATS = 20


def _sample_types() -> list[tuple[str, str]]:
    return [(m, t.type_id) for m in ("mtty", "mdpy", "mbochs") for t in PARENTS[m].types]


def _all_done(lab: Lab, uuids: list[str]) -> bool:
    states = lab.states()
    return all(states.get(u) == "done" for u in uuids)


def vfiocaps_way(lab: Lab, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    """Cold cache, every device present at start: probes until every device is published."""
    types = _sample_types()
    uuids: list[str] = []
    for module, type_id in types:
        uuids += lab.host.storm(module, type_id, DEVICES_PER_TYPE)["uuids"]
    progress.note(f"vfiocapsd probing {len(uuids)} devices of {len(types)} types")
    began = time.monotonic()
    daemon = lab.start()
    coldplugged = time.monotonic() - began
    wait_until(lambda: _all_done(lab, uuids), 120, "every device probed", interval=0.02)
    wall = time.monotonic() - began
    launches = sum(int(m["launches"]) for m in PROBE_LOG_LINE.finditer(daemon.log()))
    result = {
        "devices": len(uuids),
        "types": len(types),
        "probes": manager_property(lab.bus, "ProbeCount"),
        "launches": launches,
        "wall": wall,
        "start_to_coldplug": coldplugged,
    }
    daemon.stop()
    return result, uuids


def naive_way(lab: Lab, uuids: list[str], progress: Progress) -> dict[str, Any]:
    """The same devices, one QEMU per device and per question, sequentially."""
    progress.note(f"naive way: {2 * len(uuids)} launches, sequential")
    runtime = lab.directory / "naive-run"
    spec = {
        "qemu": str(lab.qemu),
        "dev_root": str(lab.dev),
        "runtime_dir": str(runtime),
        "probe_user": DEFAULT_PROBE_USER,
        "timeout": 30,
        "devices": [f"/sys/bus/mdev/devices/{u}" for u in uuids],
    }
    command = [*lab.host.daemon_wrapper(), sys.executable, "-m", "bench.naive_probe"]
    began = time.monotonic()
    out = subprocess.run(
        [*command, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,  # python -m finds the bench package here
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **lab.host.daemon_env()},
        timeout=600,
    )
    data: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return {
        "devices": len(uuids),
        "launches": len(data["launches"]),
        "wall": time.monotonic() - began,
        "wall_launches_only": data["wall"],
        "launch_seconds": summary(data["launches"]),
    }


def _stage_summaries(samples: list[Stages]) -> dict[str, dict[str, float]]:
    splits = [sample.split() for sample in samples]
    return {name: summary([split[name] for split in splits]) for name in splits[0]}


async def real_qemu(qemu: str, scratch: Path, progress: Progress) -> dict[str, Any]:
    """The prober's bare self-test against a bare start-QMP-quit, both with the real QEMU, the
    same accelerator and the same user and groups, alternating."""
    config = Config(
        qemu_binary=Path(qemu), runtime_dir=scratch / "run", cache_dir=scratch / "cache"
    )
    current = Stages()

    def observe(event: LaunchEvent) -> None:
        now = time.monotonic()
        if event.stage is LaunchStage.STARTED:
            current.started = now
        elif event.stage is LaunchStage.QMP_READY:
            current.qmp_ready = now
        elif event.stage is LaunchStage.ENDED:
            current.ended = now

    prober = Prober(config, observer=observe)
    known = await prober.read_qemu_properties(await prober.read_qemu())
    probes: list[float] = []
    launches: list[float] = []
    probe_stages: list[Stages] = []
    floors: list[Stages] = []
    accel = await self_test_accel(prober)  # also a warm-up: page cache, the accelerator
    with contextlib.ExitStack() as stack:
        credentials = launch_credentials(prober, stack)
        await bare_qemu(Path(qemu), accel, credentials)
        for index in range(REAL_QEMU_REPEATS):
            progress.note(f"real QEMU {index + 1}/{REAL_QEMU_REPEATS}")
            current.began = time.monotonic()
            report = await prober.check_qemu(known)
            probes.append(time.monotonic() - current.began)
            if report.outcome.value != "ok":
                raise RuntimeError(f"the prober's self-test failed: {report.error}")
            launches.append(report.duration)
            probe_stages.append(dataclasses.replace(current))
            floors.append(await bare_qemu(Path(qemu), accel, credentials))
    return {
        "accel": accel.value,
        "user": "root" if credentials is None else f"uid {credentials.uid}",
        "probe": summary(probes),
        "probe_launch": summary(launches),
        "probe_stages": _stage_summaries(probe_stages),
        "floor": summary([f.split()["total"] for f in floors]),
        "floor_stages": _stage_summaries(floors),
    }


async def real_round_trip(qemu: str, scratch: Path) -> dict[str, Any]:
    """The load side of a round trip with the real QEMU: a save launch, then the one extra
    ``-incoming defer`` launch a migratable type costs (no device: the QEMU and stream part),
    as the probe user with TCG, against a bare start-QMP-quit as that user with TCG."""
    accel = Accel.TCG
    config = Config(
        qemu_binary=Path(qemu),
        runtime_dir=scratch / "round-trip",
        cache_dir=scratch / "cache",
        probe_timeout=60.0,
    )
    prober = Prober(config)
    settings = DeviceSettings(display=OnOffAuto.OFF, migration=None)
    saves: list[float] = []
    loads: list[float] = []
    save_seconds: list[float] = []
    load_seconds: list[float] = []
    floors: list[float] = []
    stream = 0
    with contextlib.ExitStack() as stack:
        credentials = launch_credentials(prober, stack)
        for _ in range(REAL_QEMU_REPEATS):
            trip = await round_trip(prober, settings, accel)
            if trip.load_status != "completed":
                raise RuntimeError(f"the real QEMU load failed: {trip.load_status}")
            saves.append(trip.save_launch)
            loads.append(trip.load_launch)
            save_seconds.append(trip.save)
            load_seconds.append(trip.load)
            stream = trip.stream_bytes
            floor = await bare_qemu(Path(qemu), accel, credentials)
            floors.append(floor.split()["total"])
    return {
        "accel": accel.value,
        "floor": summary(floors),
        "save_launch": summary(saves),
        "load_launch": summary(loads),
        "save": summary(save_seconds),
        "load": summary(load_seconds),
        "stream_bytes": stream,
    }


def run(progress: Progress) -> dict[str, Any]:
    """Probe cost on a sample-driver host, then the real QEMU comparison."""
    lab_iter = make_lab()
    lab = next(lab_iter)
    try:
        lab.host.build("samples")
        ours, uuids = vfiocaps_way(lab, progress)
        naive = naive_way(lab, uuids, progress)
    finally:
        lab_iter.close()
    if REAL_QEMU is None:
        return {"vfiocaps": ours, "naive": naive, "real_qemu": {"skipped": "no QEMU installed"}}
    ensure_probe_user()
    scratch = Path(tempfile.mkdtemp(prefix="vfiocaps-bench-qemu-"))
    scratch.chmod(0o755)
    try:
        real = asyncio.run(real_qemu(REAL_QEMU, scratch, progress))
        progress.note("real QEMU round trip (save launch + -incoming defer launch)")
        real["round_trip"] = asyncio.run(real_round_trip(REAL_QEMU, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    version = subprocess.run(
        [REAL_QEMU, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    return {"vfiocaps": ours, "naive": naive, "real_qemu": {"qemu": version, **real}}
