"""The lab benchmark (run by run-in-guest in bench mode, not a test): vfiocapsd's probes of the
kernel's sample mdev types on the real kernel, beside a bare QEMU and the naive way.

Usage (inside the lab guest, as root, with the checkout on PYTHONPATH for ``bench``):

    PYTHONPATH=CHECKOUT:/usr/share/vfiocaps python3 bench_lab.py
        --results DIR [--repeats N] [--concurrency N ...]

One instance of every type the sample drivers offer is created while the daemon is stopped.
Then, per repeat and per concurrency, the daemon starts with an empty cache (a drop-in sets
``--probe-concurrency``) and the time until every instance is answered (``ProbeState`` done,
seen in the daemon's signals) is measured, with each device's probe (``probing`` to ``done``)
and its QEMU launches (the daemon's journal). With the daemon stopped, the naive way
(``bench/naive_probe.py``: one QEMU per device and per question) asks about each instance, and
a bare QEMU start-QMP-quit (``bench/qemu_floor.py``: same binary, no device, the probe's
accelerator, user and groups) gives the floor. Writes ``bench.json`` to DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import PROBE_LOG_LINE, add_match, summary
from bench.floor_unit import floor_command, launcher_interpreter, seconds_to_floor
from bench.naive_probe import probe_all
from bench.name_timing import seconds_to_name
from bench.qemu_floor import bare_qemu, self_test_accel
from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus
from labkit import (
    BUS_NAME,
    ROOT_PATH,
    SAMPLE_DRIVERS,
    Daemon,
    MdevLab,
    kernel_release,
    wait_for,
)

from vfiocaps.client import describe_signal
from vfiocaps.config import DEFAULT_PROBE_USER, Config, default_qemu_binary
from vfiocaps.prober import Prober, launch_credentials

DROP_IN = "50-lab-bench.conf"
# Under emulation a cold start with every sample type takes tens of seconds; a run that has not
# answered everything in this time has failed.
ALL_ANSWERED_TIMEOUT = 600.0
NAIVE_LAUNCH_TIMEOUT = 120.0
# The daemon's start, which the unit limits to 90 s: on a loaded host the emulated guest runs
# ten times slower than usual, and a start that is slow is measured rather than failed.
START_TIMEOUT = 600.0


def say(message: str) -> None:
    """One progress line on stderr (the guest's console and bench.log)."""
    print(f"lab bench: {message}", file=sys.stderr, flush=True)


def systemctl(*args: str) -> str:
    """Run systemctl; return its output.

    Raises:
        subprocess.CalledProcessError: systemctl failed.
    """
    return subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, check=True, timeout=START_TIMEOUT
    ).stdout.strip()


@dataclass(frozen=True)
class Unit:
    """The installed daemon's unit, configured through a runtime drop-in."""

    service: str

    def exec_start(self) -> list[str]:
        """The unit's own command line (without this benchmark's drop-in)."""
        shown = systemctl("show", "-P", "ExecStart", self.service)
        found = re.search(r"argv\[\]=([^;]*);", shown)
        if not found:
            raise RuntimeError(f"cannot read ExecStart of {self.service}: {shown!r}")
        return found.group(1).split()

    def drop_in(self) -> Path:
        """Where the benchmark's drop-in lives (under /run: gone at the next boot)."""
        return Path("/run/systemd/system") / f"{self.service}.d" / DROP_IN

    def configure(self, base: list[str], concurrency: int) -> None:
        """Start the daemon with ``--probe-concurrency`` *concurrency* from now on."""
        path = self.drop_in()
        path.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join([*base, "--probe-concurrency", str(concurrency)])
        path.write_text(
            f"[Service]\nExecStart=\nExecStart={command}\nTimeoutStartSec={START_TIMEOUT:.0f}\n"
        )
        systemctl("daemon-reload")

    def unconfigure(self) -> None:
        """Remove the drop-in."""
        self.drop_in().unlink(missing_ok=True)
        systemctl("daemon-reload")

    def cache_dir(self) -> Path:
        """The unit's cache directory (``CacheDirectory=``)."""
        names = systemctl("show", "-P", "CacheDirectory", self.service).split()
        if not names:
            raise RuntimeError(f"{self.service} has no CacheDirectory=")
        return Path("/var/cache") / names[0]


def empty(directory: Path) -> None:
    """Remove everything inside *directory* (the daemon's cache: a cold start)."""
    for entry in directory.iterdir() if directory.exists() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def journal_cursor() -> str:
    """The journal's current end: entries after it are new."""
    out = subprocess.run(
        ["journalctl", "--no-pager", "-n", "0", "--show-cursor"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    found = re.search(r"^-- cursor: (.+)$", out, re.MULTILINE)
    if not found:
        raise RuntimeError(f"journalctl gave no cursor: {out!r}")
    return found.group(1)


def probe_lines(service: str, cursor: str, devices: int) -> dict[str, dict[str, Any]]:
    """The daemon's end-of-probe lines after *cursor*: {device id: outcome, launches, seconds}.

    Waits (briefly) for journald to hold a line for each of *devices* devices.
    """

    def read() -> dict[str, dict[str, Any]] | None:
        text = subprocess.run(
            ["journalctl", "--no-pager", "-o", "cat", "-u", service, f"--after-cursor={cursor}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        ).stdout
        found = {
            match["device"]: {
                "outcome": match["outcome"],
                "launches": int(match["launches"]),
                "launch_seconds": float(match["seconds"]),
            }
            for match in PROBE_LOG_LINE.finditer(text)
        }
        return found if len([d for d in found if d != "QEMU"]) >= devices else None

    return dict(wait_for(read, 30, "the daemon's probe lines in the journal", 1.0))


@dataclass
class StateWatch:
    """Device states from org.vfiocaps's signals, the first arrival of each state stamped."""

    expected: set[str]  # the UUIDs that must be answered
    uuids: dict[str, str] = field(default_factory=dict)  # object path -> UUID
    seen: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> state -> time
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ids: dict[str, str] = field(default_factory=dict)  # object path -> device id (monitor's)

    async def subscribe(self, bus: MessageBus) -> None:
        """Add the match rule and the handler (before the daemon starts: nothing is missed)."""
        rule = f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}'"
        await add_match(bus, rule)
        bus.add_message_handler(self._on_message)

    def _on_message(self, message: Message) -> None:
        event = describe_signal(message, self.ids)
        if event and event["Event"] in ("device-added", "device-changed"):
            self.note(event["Path"], event.get("Uuid"), event.get("ProbeState"), time.monotonic())

    def note(self, path: str, mdev_uuid: str | None, state: str | None, at: float) -> None:
        """Record what is known of one device at *at* (a signal, or a snapshot)."""
        if mdev_uuid:
            self.uuids[path] = str(mdev_uuid).lower()
        if state:
            self.seen.setdefault(path, {}).setdefault(str(state), at)
            self.changed.set()

    def answered(self) -> dict[str, dict[str, float]]:
        """{UUID: state -> first time} of the expected devices seen done so far."""
        return {
            self.uuids[path]: states
            for path, states in self.seen.items()
            if self.uuids.get(path) in self.expected and "done" in states
        }

    def unanswered(self) -> dict[str, str]:
        """{UUID: last state seen} of the expected devices not done yet."""
        last = {
            self.uuids[path]: max(states, key=lambda s: states[s])
            for path, states in self.seen.items()
            if path in self.uuids
        }
        answered = self.answered()
        return {u: last.get(u, "unseen") for u in sorted(self.expected) if u not in answered}


async def cold_start(
    unit: Unit, daemon: Daemon, devices: dict[str, str], concurrency: int
) -> dict[str, Any]:
    """Start the stopped daemon with an empty cache; time it until every device is answered."""
    empty(unit.cache_dir())
    cursor = journal_cursor()
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        watch = StateWatch(expected=set(devices.values()))
        await watch.subscribe(bus)
        began = time.monotonic()
        name_owned = await seconds_to_name(
            bus, BUS_NAME, lambda: systemctl("start", unit.service), ALL_ANSWERED_TIMEOUT
        )
        snapshot = await asyncio.to_thread(daemon.devices)
        taken = time.monotonic()
        for path, props in snapshot.items():
            watch.note(path, props.get("Uuid"), props.get("ProbeState"), taken)
        deadline = began + ALL_ANSWERED_TIMEOUT
        while len(watch.answered()) < len(devices):
            watch.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"not answered in time: {watch.unanswered()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.changed.wait(), min(left, 5.0))
            failed = {u: s for u, s in watch.unanswered().items() if s in ("failed", "busy")}
            if failed:
                raise RuntimeError(f"probes did not succeed: {failed}\n{daemon.journal(40)}")
        answered = watch.answered()
    finally:
        bus.disconnect()
    await asyncio.to_thread(systemctl, "stop", unit.service)
    lines = probe_lines(unit.service, cursor, len(devices))
    last = max(states["done"] for states in answered.values())
    per_type = {}
    for type_id, mdev_uuid in devices.items():
        states = answered[mdev_uuid]
        line = lines.get(mdev_uuid, {})
        if line.get("outcome") != "ok":
            raise RuntimeError(f"no successful probe line for {type_id} ({mdev_uuid}): {line}")
        probing = states.get("probing")
        probe_s = states["done"] - probing if probing is not None else None
        per_type[type_id] = {
            "probe_s": probe_s,
            "outside_launches_s": (
                probe_s - line["launch_seconds"] if probe_s is not None else None
            ),
            "answered_s": states["done"] - began,
            **line,
        }
    return {
        "concurrency": concurrency,
        "all_answered_s": last - began,
        "name_owned_s": name_owned,
        "launches": sum(line["launches"] for line in lines.values()),
        "types": per_type,
    }


async def naive_and_floor(
    devices: dict[str, str], repeats: int, scratch: Path
) -> tuple[dict[str, list[dict[str, Any]]], list[float], str]:
    """With the daemon stopped: the naive way for each device and a bare QEMU beside each, as
    the probe user with the probes' accelerator. Returns ({type: runs}, floors, accelerator)."""
    qemu = default_qemu_binary()
    config = Config(qemu_binary=qemu, runtime_dir=scratch / "run", cache_dir=scratch / "cache")
    prober = Prober(config)
    await prober.read_qemu()
    accel = await self_test_accel(prober)  # also a warm-up of the binary and the accelerator
    naive: dict[str, list[dict[str, Any]]] = {type_id: [] for type_id in devices}
    floors: list[float] = []
    with contextlib.ExitStack() as stack:
        credentials = launch_credentials(prober, stack)
        await bare_qemu(qemu, accel, credentials)
        for repeat in range(repeats):
            for type_id, mdev_uuid in devices.items():
                say(f"naive way and bare QEMU, {type_id}, round {repeat + 1}/{repeats}")
                spec = {
                    "qemu": str(qemu),
                    "dev_root": str(config.dev_root),
                    "runtime_dir": str(scratch / "naive"),
                    "probe_user": DEFAULT_PROBE_USER,
                    "timeout": NAIVE_LAUNCH_TIMEOUT,
                    "devices": [f"/sys/bus/mdev/devices/{mdev_uuid}"],
                }
                run = await probe_all(spec)
                naive[type_id].append(
                    {
                        "wall_s": run["wall"],
                        "launches": len(run["launches"]),
                        "accel": run["accel"],
                        "answers": {key.split()[-1]: v for key, v in run["answers"].items()},
                    }
                )
                floors.append((await bare_qemu(qemu, accel, credentials)).split()["total"])
    return naive, floors, accel.value


def sample_devices(mdevs: MdevLab) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """One new instance of every type the sample drivers offer: ({type: UUID}, {type: facts})."""
    devices: dict[str, str] = {}
    facts: dict[str, dict[str, str]] = {}
    for module in SAMPLE_DRIVERS:
        for type_id, name in mdevs.types(module).items():
            devices[type_id] = mdevs.create(module, type_id)
            facts[type_id] = {"driver": module, "name": name}
    return devices, facts


def qemu_version() -> str:
    """The first line of ``qemu-system-x86_64 --version`` (the binary the daemon uses)."""
    return subprocess.run(
        [str(default_qemu_binary()), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()[0]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the lab benchmark."""
    daemon, mdevs, unit = Daemon(args.service), MdevLab(), Unit(args.service)
    # The first start (by the installation) is not measured; on a slow host it may exceed the
    # unit's start timeout, and the benchmark's own starts allow for that (see Unit.configure).
    wait_for(
        lambda: daemon.is_serving() or daemon.has_failed(), START_TIMEOUT, "vfiocapsd to serve"
    )
    # A driver's registration starts the daemon (udev): load them all before stopping it.
    for module in SAMPLE_DRIVERS:
        mdevs.load(module)
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=True, timeout=90)
    base = unit.exec_start()
    if args.daemon_verbose:
        base = [*base, "--verbose"]
    interpreter = launcher_interpreter(Path(base[0]))  # the daemon's, for its start's floor
    systemctl("stop", unit.service)
    devices, facts = sample_devices(mdevs)
    say(f"one instance each of {', '.join(devices)}")
    starts: list[dict[str, Any]] = []
    start_floors: list[float] = []
    try:
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                floor_unit = f"vfiocaps-bench-floor-{len(start_floors)}"
                start_floors.append(
                    asyncio.run(
                        seconds_to_floor(BUS_NAME, floor_unit, interpreter, ALL_ANSWERED_TIMEOUT)
                    )
                )
                say(f"cold start, concurrency {concurrency}, round {repeat + 1}/{args.repeats}")
                unit.configure(base, concurrency)
                run = asyncio.run(cold_start(unit, daemon, devices, concurrency))
                say(
                    f"  every type answered after {run['all_answered_s']:.1f} s; name owned "
                    f"after {run['name_owned_s']:.2f} s (floor {start_floors[-1]:.2f} s)"
                )
                starts.append(run)
    finally:
        unit.unconfigure()
    scratch = Path(tempfile.mkdtemp(prefix="vfiocaps-lab-bench-"))
    scratch.chmod(0o755)
    try:
        naive, floors, accel = asyncio.run(naive_and_floor(devices, args.repeats, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures = summarise(devices, facts, starts, naive, floors, accel, args)
    figures["name_floor"] = summary(start_floors)
    figures["name_floor_runs"] = start_floors
    figures["name_floor_command"] = floor_command("vfiocaps-bench-floor-N", interpreter, BUS_NAME)
    return figures


def summarise(
    devices: dict[str, str],
    facts: dict[str, dict[str, str]],
    starts: list[dict[str, Any]],
    naive: dict[str, list[dict[str, Any]]],
    floors: list[float],
    accel: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Medians (``summary``) of the runs, per type and per concurrency; the runs themselves."""
    alone = [run for run in starts if run["concurrency"] == 1] or starts
    types = {}
    for type_id in devices:
        ours = [run["types"][type_id] for run in alone]
        theirs = naive[type_id]
        types[type_id] = {
            **facts[type_id],
            "probe": summary([p["probe_s"] for p in ours if p["probe_s"] is not None]),
            "probe_launches": sorted({p["launches"] for p in ours}),
            "probe_launch_seconds": summary([p["launch_seconds"] for p in ours]),
            "outside_launches": summary(
                [p["outside_launches_s"] for p in ours if p["outside_launches_s"] is not None]
            ),
            "naive": summary([n["wall_s"] for n in theirs]),
            "naive_launches": sorted({n["launches"] for n in theirs}),
            "naive_answers": theirs[-1]["answers"],
        }
    concurrency = {}
    for level in args.concurrency:
        runs = [run for run in starts if run["concurrency"] == level]
        concurrency[str(level)] = {
            "all_answered": summary([run["all_answered_s"] for run in runs]),
            "name_owned": summary([run["name_owned_s"] for run in runs]),
            "launches": sorted({run["launches"] for run in runs}),
        }
    return {
        "kernel": kernel_release(),
        "guest_cpus": os.cpu_count(),
        "qemu": qemu_version(),
        "accel": accel,
        "naive_accel": sorted({n["accel"] for runs in naive.values() for n in runs}),
        "repeats": args.repeats,
        "floor": summary(floors),
        "types": types,
        "start_to_all_answered": concurrency,
        "cold_starts": starts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="where bench.json goes")
    parser.add_argument("--service", default="vfiocapsd.service")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="probe concurrency of a cold start (repeatable; default 1 and 2)",
    )
    parser.add_argument(
        "--daemon-verbose",
        action="store_true",
        help="start the daemon with --verbose: its journal then has each probe's time per step",
    )
    args = parser.parse_args()
    args.concurrency = args.concurrency or [1, 2]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    output = args.results / "bench.json"
    output.unlink(missing_ok=True)
    began = time.monotonic()
    try:
        figures = measure(args)
    except (RuntimeError, AssertionError, OSError, subprocess.SubprocessError) as err:
        say(f"failed: {err}")
        return 1
    figures["bench_s"] = time.monotonic() - began
    output.write_text(json.dumps(figures, indent=1) + "\n")  # types in sysfs order
    say(f"done in {figures['bench_s']:.0f} s; wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
