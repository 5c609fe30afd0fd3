"""Query latency, throughput and hotplug-to-published of a running vfiocapsd, beside the floor.

The daemon runs on a umockdev host (``tests/daemon_lab.py``) with the fake QEMU, its cache
warm for the queried device. The floor is ``floor_service.py`` on the same private bus, built on
the same library and connection class, answering a constant of the same size.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_FLOOR_NAME,
    BENCH_FLOOR_PATH,
    Progress,
    add_match,
    cpu_seconds,
    python_daemon_pid,
    summary,
)
from support.daemon_lab import MANAGER, Lab, make_lab
from support.harness import BUS_NAME, ROOT_PATH, busctl, wait_until
from vfiocaps.bus.device import device_path
from vfiocaps.discovery.service import QUIET_SECONDS

HERE = Path(__file__).resolve().parent
LATENCY_ROUNDS = 3
LATENCY_CALLS = 2000
THROUGHPUT_CLIENTS = (1, 8, 64)
THROUGHPUT_SECONDS = 2.0
THROUGHPUT_ROUNDS = 4
HOTPLUG_REPEATS = 60


def _call(destination: str, path: str, interface: str, member: str, arg: str) -> dict[str, Any]:
    return {
        "destination": destination,
        "path": path,
        "interface": interface,
        "member": member,
        "signature": "s",
        "body": [arg],
    }


def _worker(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "client_worker.py"), json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=300)
    if process.returncode != 0:
        raise RuntimeError(f"a benchmark client failed with status {process.returncode}")
    data: dict[str, Any] = json.loads(out)
    return data


def _reply_entries(lab: Lab, device_id: str) -> list[list[Any]]:
    out = busctl(
        lab.bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH, MANAGER, "GetCapabilities",
        "s", device_id,
    )  # fmt: skip
    reply = json.loads(out.stdout)["data"][0]
    return [[key, value["type"], value["data"]] for key, value in reply.items()]


def measure_latency(
    lab: Lab, targets: dict[str, dict[str, Any]], progress: Progress
) -> dict[str, list[float]]:
    """Sequential round trips per target, interleaved in rounds so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for round_ in range(LATENCY_ROUNDS):
        for name, call in targets.items():
            progress.note(f"latency round {round_ + 1}/{LATENCY_ROUNDS}, {name}")
            spec = {
                "mode": "latency",
                "address": lab.bus.address,
                "call": call,
                "warmup": 200,
                "count": LATENCY_CALLS,
            }
            samples[name] += _result(_worker(spec))["samples"]
    return samples


def measure_throughput(
    lab: Lab, targets: dict[str, dict[str, Any]], pids: dict[str, int], progress: Progress
) -> dict[str, Any]:
    """Calls per second with each number of concurrent client connections, and the serving
    process's CPU time per call (which other load on the machine disturbs far less).

    The targets alternate round by round and the best round of each counts, so that a burst of
    load from elsewhere on the machine does not decide the comparison.
    """
    rates: dict[str, dict[int, float]] = {name: {} for name in targets}
    cpu: dict[str, dict[int, float]] = {name: {} for name in targets}
    for clients in THROUGHPUT_CLIENTS:
        processes = 1 if clients == 1 else 2
        for round_ in range(THROUGHPUT_ROUNDS):
            for name, call in targets.items():
                progress.note(f"{clients} clients, round {round_ + 1}, {name}")
                start_at = time.time() + 1.0 + clients * 0.02
                workers = [
                    _worker(
                        {
                            "mode": "throughput",
                            "address": lab.bus.address,
                            "call": call,
                            "connections": clients // processes,
                            "start_at": start_at,
                            "seconds": THROUGHPUT_SECONDS,
                        }
                    )
                    for _ in range(processes)
                ]
                time.sleep(max(0.0, start_at - time.time()))
                cpu_before = cpu_seconds(pids[name])
                time.sleep(THROUGHPUT_SECONDS)
                cpu_used = cpu_seconds(pids[name]) - cpu_before
                calls = sum(_result(w)["calls"] for w in workers)
                rate = calls / THROUGHPUT_SECONDS
                rates[name][clients] = max(rates[name].get(clients, 0.0), rate)
                per_call = cpu_used / calls
                cpu[name][clients] = min(cpu[name].get(clients, per_call), per_call)
    return {"rates": rates, "cpu_per_call": cpu}


@dataclass
class SignalRecorder:
    """Listens on the bus in a thread; notes when each device path is published probed."""

    address: str
    done_at: dict[str, float] = field(default_factory=dict)
    added_state: dict[str, str] = field(default_factory=dict)
    condition: threading.Condition = field(default_factory=threading.Condition)
    ready: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def _note(self, path: str, state: str, now: float) -> None:
        if state == "done":
            with self.condition:
                self.done_at.setdefault(path, now)
                self.condition.notify_all()

    async def _listen(self) -> None:
        from dbus_fast import Message
        from dbus_fast.aio import MessageBus

        bus = await MessageBus(bus_address=self.address).connect()

        def handler(message: Message) -> None:
            now = time.time()
            if message.member == "InterfacesAdded":
                path, interfaces = message.body
                props = interfaces.get("org.vfiocaps1.Device", {})
                state = props["ProbeState"].value if "ProbeState" in props else ""
                self.added_state[path] = state
                self._note(path, state, now)
            elif message.member == "PropertiesChanged":
                _, changed, _ = message.body
                if "ProbeState" in changed:
                    self._note(message.path, changed["ProbeState"].value, now)

        bus.add_message_handler(handler)
        for rule in (
            "type='signal',interface='org.freedesktop.DBus.ObjectManager',member='InterfacesAdded'",
            "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'",
        ):
            await add_match(bus, rule)
        self.ready.set()
        await asyncio.to_thread(self.stop.wait)
        bus.disconnect()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)
        thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the signal listener did not connect")
        return thread

    def wait_done(self, path: str, timeout: float) -> float:
        with self.condition:
            if not self.condition.wait_for(lambda: path in self.done_at, timeout):
                raise RuntimeError(f"{path} was not published as probed within {timeout} s")
            return self.done_at[path]


def measure_hotplug(lab: Lab, progress: Progress) -> dict[str, Any]:
    """Time from an instance's ``add`` uevent to its publication with ProbeState done."""
    recorder = SignalRecorder(lab.bus.address)
    thread = recorder.start()
    samples: list[float] = []
    sending: list[float] = []
    try:
        for index in range(HOTPLUG_REPEATS):
            progress.note(f"hotplug {index + 1}/{HOTPLUG_REPEATS}")
            burst = lab.host.storm("mtty", "mtty-1", 1)
            path = device_path(burst["uuids"][0])
            samples.append(recorder.wait_done(path, 10) - burst["began"])
            sending.append(burst["ended"] - burst["began"])
            time.sleep(0.05)
    finally:
        recorder.stop.set()
        thread.join(5)
    states = {state for state in recorder.added_state.values()}
    return {
        "samples": samples,
        "uevent_sending": summary(sending),
        "states_at_interfaces_added": sorted(states),
        "discovery_quiet_seconds": QUIET_SECONDS,
    }


def run(progress: Progress) -> dict[str, Any]:
    """Latency, throughput and hotplug against one daemon; returns the raw figures."""
    lab_iter = make_lab()
    lab = next(lab_iter)
    floor: subprocess.Popen[bytes] | None = None
    try:
        progress.note("starting vfiocapsd and probing the first device")
        lab.host.build("mtty")
        daemon = lab.start()
        device = lab.host.add_instance("mtty", "mtty-1")
        lab.wait_states({device: "done"})
        entries = _reply_entries(lab, device)
        reply_file = lab.directory / "floor-reply.json"
        reply_file.write_text(json.dumps(entries))
        floor = subprocess.Popen(
            [sys.executable, str(HERE / "floor_service.py"), lab.bus.address, str(reply_file)]
        )
        wait_until(lambda: lab.bus.name_has_owner(BENCH_FLOOR_NAME), 20, "the floor service")
        targets = {
            "floor": _call(
                BENCH_FLOOR_NAME, BENCH_FLOOR_PATH, BENCH_FLOOR_NAME, "GetCapabilities", device
            ),
            "floor-sync": _call(
                BENCH_FLOOR_NAME, BENCH_FLOOR_PATH, BENCH_FLOOR_NAME, "GetCapabilitiesSync", device
            ),
            "vfiocapsd": _call(BUS_NAME, ROOT_PATH, MANAGER, "GetCapabilities", device),
        }
        latency = measure_latency(lab, targets, progress)
        del targets["floor-sync"]
        assert daemon.process is not None
        pids = {"floor": floor.pid, "vfiocapsd": python_daemon_pid(daemon.process.pid)}
        throughput = measure_throughput(lab, targets, pids, progress)
        hotplug = measure_hotplug(lab, progress)
        return {
            "reply_entries": len(entries),
            "latency": {name: summary(values) for name, values in latency.items()},
            "latency_samples": latency,
            "throughput": throughput["rates"],
            "cpu_per_call": throughput["cpu_per_call"],
            "hotplug": {**summary(hotplug["samples"]), **hotplug},
        }
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait(10)
        lab_iter.close()
