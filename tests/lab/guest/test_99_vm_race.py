"""Probes yield to VMs: instances of unprobed types are created and a libvirt VM started on them
at once, with the vfiocaps hook: every start succeeds, and every device gets its answer once the
VM is gone, without anyone asking again. With the hook, each round (`--races N` for N rounds) is
one VM holding a new instance of every sample driver, so the hook holds several devices of one
domain at once. Without the hook each driver gets its own VM in each round, and the starts that
fail are counted, not judged, and only when asked (`tests/lab/run -- -m measure -k race --races 5`).
Runs last: it removes and re-creates (with the same UUIDs) the instances of the types it races
on."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labkit import SAMPLE_TYPES, SYSFS, Daemon, MdevLab, wait_for
from libvirtkit import DOMAIN_PREFIX, DomainParts, Libvirt, domain

HOOK = Path("/etc/libvirt/hooks/qemu.d/vfiocaps")
HOOK_PARKED = Path("/var/tmp/vfiocaps-hook.parked")
WORKDIR = Path("/var/tmp/vfiocaps-lab-race")
ANSWER_SECONDS = 240.0  # with the hook: the answer is a must
BARE_ANSWER_SECONDS = 30.0  # without: recorded, not judged (a failed probe retries after 30 s)
RACES: list[dict[str, Any]] = []
# Up to 15 races (--races 5 without the hook) of a VM start, a probe and a stop each: far beyond
# the suite's 900 s per test under TCG on a loaded host.
RACE_TIMEOUT = 5400


def hostdev(mdev_uuid: str) -> ET.Element:
    element = ET.Element("hostdev", mode="subsystem", type="mdev", model="vfio-pci")
    source = ET.SubElement(element, "source")
    ET.SubElement(source, "address", uuid=mdev_uuid)
    return element


def restart_libvirtd(libvirt: Libvirt) -> None:
    """libvirtd reads its hooks when it starts."""
    subprocess.run(["systemctl", "restart", "libvirtd"], check=True, timeout=120)
    wait_for(lambda: libvirt.virsh("version", check="libvirt up", timeout=60).ok, 120, "libvirtd")


@pytest.fixture(scope="module")
def race_types(mdevs: MdevLab) -> Iterator[dict[str, str]]:
    """{module: type id} with no live instance; the instances removed are re-created after."""
    chosen = {module: type_ids[0] for module, type_ids in SAMPLE_TYPES.items()}
    for module in chosen:
        mdevs.load(module)
    removed = [
        (module, type_id, found)
        for module, type_id in chosen.items()
        for found in mdevs.instances_of(module)
        if mdevs.type_of(found) == type_id
    ]
    for _, _, found in removed:
        mdevs.remove(found)
    try:
        yield chosen
    finally:
        for module, type_id, found in removed:
            create = mdevs.parent_dir(module) / "mdev_supported_types" / type_id / "create"
            create.write_text(found)
        save()


def save() -> None:
    """vm-race.json in the results share, after every race (a run cut short keeps its data)."""
    results = os.environ.get("VFIOCAPS_LAB_RESULTS")
    if results:
        (Path(results) / "vm-race.json").write_text(json.dumps(RACES, indent=2))


def state(daemon: Daemon, mdev_uuid: str) -> tuple[str, str]:
    found = daemon.device_by_uuid(mdev_uuid)
    if found is None:
        return "absent", ""
    return str(found[1].get("ProbeState")), str(found[1].get("LastError", ""))


def race(
    libvirt: Libvirt,
    daemon: Daemon,
    mdevs: MdevLab,
    types: list[tuple[str, str]],
    name: str,
    answer_seconds: float,
) -> list[dict[str, Any]]:
    """Drop the answers of the drivers of *types* ([(module, type id)]), create an instance of
    each and start one VM on all of them at once; stop it and wait for every device's answer.
    One record per device, each with the VM's start."""
    created = [(module, type_id, str(uuid.uuid4())) for module, type_id in types]
    WORKDIR.mkdir(parents=True, exist_ok=True)
    xml_file = WORKDIR / f"{name}.xml"
    parts = DomainParts(hostdevs=[hostdev(mdev_uuid) for _, _, mdev_uuid in created])
    xml_file.write_text(domain(name, parts))
    assert libvirt.virsh("define", str(xml_file), check="race: define").ok
    for module, _, _ in created:
        daemon.manager("Invalidate", "s", module)
    for module, type_id, mdev_uuid in created:
        create = mdevs.parent_dir(module) / "mdev_supported_types" / type_id / "create"
        create.write_text(mdev_uuid)
    started = libvirt.virsh("start", name, check=f"race: {name} start")
    running: dict[str, tuple[str, str]] = {}
    if started.ok:
        time.sleep(3)  # the VM runs: the daemon must leave its devices alone
        running = {mdev_uuid: state(daemon, mdev_uuid) for _, _, mdev_uuid in created}
    libvirt.virsh("destroy", name, check="race: destroy", timeout=120)
    began = time.monotonic()

    def answered() -> bool:
        return all(state(daemon, mdev_uuid)[0] == "done" for _, _, mdev_uuid in created)

    with contextlib.suppress(AssertionError):
        wait_for(answered, answer_seconds, "the answers", 1.0)
    waited = round(time.monotonic() - began, 1)
    answers = {mdev_uuid: state(daemon, mdev_uuid) for _, _, mdev_uuid in created}
    libvirt.virsh("undefine", name, check="cleanup", timeout=120)
    for _, _, mdev_uuid in created:
        if (SYSFS / "bus/mdev/devices" / mdev_uuid).exists():
            mdevs.remove(mdev_uuid)
    return [
        {
            "domain": name,
            "module": module,
            "type": type_id,
            "uuid": mdev_uuid,
            "started": started.ok,
            "start_seconds": round(started.seconds, 2),
            "start_error": "" if started.ok else started.message()[-400:],
            "state_while_running": list(running.get(mdev_uuid, ("", ""))),
            "answer": list(answers[mdev_uuid]),
            "answer_seconds_after_stop": waited,
        }
        for module, type_id, mdev_uuid in created
    ]


@pytest.fixture(scope="module")
def trials(request: pytest.FixtureRequest) -> int:
    """Rounds of races: the suite's --races."""
    wanted = int(request.config.getoption("races"))
    if wanted < 1:
        raise pytest.UsageError("--races must be at least 1")
    return wanted


def rounds(race_types: dict[str, str], trials: int) -> list[tuple[int, str, str]]:
    """(index, module, type) for *trials* rounds over the drivers, one driver after the other in
    each round, so that a run cut short still has every driver."""
    return [(i, m, t) for i in range(trials) for m, t in race_types.items()]


@pytest.mark.measure
@pytest.mark.timeout(RACE_TIMEOUT)
def test_starts_race_probes_without_the_hook(
    race_types: dict[str, str], trials: int, daemon: Daemon, mdevs: MdevLab, libvirt: Libvirt
) -> None:
    """Counted, not judged: what a stack without the hook gets (settle time and busy skip)."""
    assert HOOK.exists(), "make install did not install the libvirt hook"
    HOOK.rename(HOOK_PARKED)
    try:
        restart_libvirtd(libvirt)
        for index, module, type_id in rounds(race_types, trials):
            name = f"{DOMAIN_PREFIX}race-bare-{type_id}-{index}"
            found = race(libvirt, daemon, mdevs, [(module, type_id)], name, BARE_ANSWER_SECONDS)
            RACES.extend({"hook": False, **record} for record in found)
            save()
    finally:
        HOOK_PARKED.rename(HOOK)
        restart_libvirtd(libvirt)
    bare = [r for r in RACES if not r["hook"]]
    failed = [r for r in bare if not r["started"]]
    print(f"without the hook: {len(failed)} of {len(bare)} starts failed")


@pytest.mark.timeout(RACE_TIMEOUT)
def test_with_the_hook_every_start_succeeds_and_every_device_is_answered(
    race_types: dict[str, str], trials: int, daemon: Daemon, mdevs: MdevLab, libvirt: Libvirt
) -> None:
    # libvirtd has read the hook: the libvirt fixture restarted it after the package installed it,
    # and the test without the hook restarts it with the hook back in place.
    assert os.access(HOOK, os.X_OK), "the libvirt hook is not installed executable"
    runs: list[dict[str, Any]] = []
    for index in range(trials):
        name = f"{DOMAIN_PREFIX}race-hook-{index}"
        found = race(libvirt, daemon, mdevs, list(race_types.items()), name, ANSWER_SECONDS)
        runs += [{"hook": True, **record} for record in found]
        RACES.extend(runs[-len(found) :])
        save()
    failed = [(r["domain"], r["start_error"]) for r in runs if not r["started"]]
    assert failed == [], failed
    unanswered = [(r["domain"], r["answer"]) for r in runs if r["answer"][0] != "done"]
    assert unanswered == [], unanswered
    held = [r for r in runs if "held by domain" in r["state_while_running"][1]]
    print(f"with the hook: {trials} of {trials} starts succeeded, {len(held)} of {len(runs)} held")
