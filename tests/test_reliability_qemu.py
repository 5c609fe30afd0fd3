"""QEMU faults through the real daemon: hung, crashed, noisy and replaced QEMU; probe privileges.

The device is an mtty sample instance on a umockdev host; QEMU is the fake that speaks real QMP,
told by ``overrides.json`` to misbehave at one QMP command (``fault``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from support.daemon_lab import Lab, capabilities, manager_property
from support.harness import BUS_NAME, ROOT_PATH, busctl, gdbus, wait_until
from support.prober import REAL_QEMU
from support.reliability import (
    cmdline,
    daemon_pid,
    history,
    probe_leftovers,
    proc_status,
    qemu_pids,
    zombie_children,
)

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

FAULTY = "0f0f0f0f-0000-4000-8000-00000000fa17"
MANAGER = "org.vfiocaps1.Manager"


def fault_lab(lab: Lab, fault: dict[str, object], *args: str) -> tuple[int, object]:
    lab.host.build("mtty")
    lab.overrides({"devices": {FAULTY: {"fault": {"on": "query-migrate", **fault}}}})
    daemon = lab.start("--probe-retry-seconds", "600", *args)
    return daemon_pid(daemon), daemon


def assert_clean_after(lab: Lab, pid: int, daemon: object) -> None:
    """No QEMU left, none unreaped, no probe files; a probe of another type still works."""
    wait_until(lambda: not qemu_pids(lab), 10, "every QEMU to be gone")
    assert zombie_children(pid) == []
    assert probe_leftovers(daemon) == []  # type: ignore[arg-type]
    healthy = lab.host.add_instance("mtty", "mtty-2")
    lab.wait_states({healthy: "done"}, timeout=30)
    caps = capabilities(lab.bus, healthy)
    assert (caps["Display"], caps["MigrationWithOptions"]) == ("none", "supported")


@pytest.mark.parametrize(
    ("fault", "outcome", "error"),
    [
        ({"signal": "SIGSTOP"}, "timeout", "did not finish in time and was killed"),
        ({"signal": "SIGKILL"}, "crashed", "SIGKILL"),
    ],
    ids=["hung-sigstop", "crashed-sigkill"],
)
def test_a_hung_or_crashed_qemu_is_recorded_reaped_and_cleaned_up(
    lab: Lab, fault: dict[str, object], outcome: str, error: str
) -> None:
    pid, daemon = fault_lab(lab, fault, "--probe-timeout", "2")
    started = time.monotonic()
    lab.host.add_instance("mtty", "mtty-1", uuid=FAULTY)
    lab.wait_states({FAULTY: "failed"}, timeout=30)
    elapsed = time.monotonic() - started
    caps = capabilities(lab.bus, FAULTY)
    assert error in caps["LastError"], caps["LastError"]
    if outcome == "timeout":
        assert elapsed < 15
    assert_clean_after(lab, pid, daemon)
    time.sleep(0.3)
    rows = history(lab.directory / "cache" / "capabilities.sqlite")
    assert ("mtty", "mtty-1", outcome) in rows, rows
    assert ("mtty", "mtty-2", "ok") in rows


def test_qemu_flooding_stderr_costs_no_memory(lab: Lab) -> None:
    flood = 64 * 1024 * 1024
    pid, daemon = fault_lab(lab, {"stderr_bytes": flood})
    rss_before = int(proc_status(pid)["VmRSS"].split()[0])
    lab.host.add_instance("mtty", "mtty-1", uuid=FAULTY)
    lab.wait_states({FAULTY: "done"}, timeout=60)
    rss_after = int(proc_status(pid)["VmRSS"].split()[0])
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)  # KiB: far below 64 MiB
    assert capabilities(lab.bus, FAULTY)["Display"] == "none"
    assert_clean_after(lab, pid, daemon)


def test_qemu_flooding_stderr_does_not_change_the_answer(lab: Lab) -> None:
    fault_lab(lab, {"stderr_bytes": 1024 * 1024})
    lab.host.add_instance("mtty", "mtty-1", uuid=FAULTY)
    lab.wait_states({FAULTY: "done"}, timeout=60)
    assert capabilities(lab.bus, FAULTY)["MigrationWithOptions"] == "supported"


def test_qemu_replaced_while_a_probe_runs(lab: Lab) -> None:
    pid, daemon = fault_lab(lab, {"pause_seconds": 1})
    old_version = manager_property(lab.bus, "QemuVersion")
    lab.host.add_instance("mtty", "mtty-1", uuid=FAULTY)
    wait_until(lambda: qemu_pids(lab), 20, "the probe QEMU")
    replacement = lab.qemu.with_name("qemu.new")
    shutil.copy2(lab.qemu, replacement)
    overrides = json.loads((lab.qemu.parent / "overrides.json").read_text())
    lab.overrides({**overrides, "qemu_version": "10.1.2"})
    os.replace(replacement, lab.qemu)
    lab.wait_states({FAULTY: "done"}, timeout=30)
    out = busctl(
        lab.bus.address, "call", BUS_NAME, ROOT_PATH, MANAGER, "Refresh", "s", FAULTY, timeout=60
    )
    assert out.returncode == 0
    assert manager_property(lab.bus, "QemuVersion") == "10.1.2" != old_version
    caps = capabilities(lab.bus, FAULTY)
    assert caps["QemuVersion"] == "10.1.2"
    assert "QEMU changed" in daemon.log()  # type: ignore[attr-defined]
    assert_clean_after(lab, pid, daemon)


def test_probe_qemu_runs_unprivileged_with_a_validated_argv(lab: Lab) -> None:
    argv_log = lab.directory / "argv.log"
    argv_log.write_text("")
    argv_log.chmod(0o666)
    lab.host.build("mtty")
    lab.overrides(
        {
            "argv_log": str(argv_log),
            "devices": {FAULTY: {"fault": {"on": "query-migrate", "pause_seconds": 1.5}}},
        }
    )
    lab.start()
    hostile = [
        f"{FAULTY},sysfsdev=/etc",
        f"{FAULTY};touch /tmp/x",
        f"$({FAULTY})",
        f"{FAULTY}\n",
        f"/sys/bus/mdev/devices/{FAULTY},x-bar=1",
        "-device vfio-pci,host=00:02.0",
    ]
    for value in hostile:
        for member in ("GetCapabilities", "Refresh", "DomainXml"):
            reply = gdbus(
                lab.bus.address, "call", "--dest", BUS_NAME, "--object-path", ROOT_PATH,
                "--method", f"{MANAGER}.{member}", "--", value, check=False,
            )  # fmt: skip
            assert reply.returncode != 0
            assert re.search(r"org\.vfiocaps1\.Error\.(InvalidArgument|NotFound)", reply.stderr), (
                value,
                reply.stderr,
            )
    assert manager_property(lab.bus, "ProbeCount") == 0
    lab.host.add_instance("mtty", "mtty-1", uuid=FAULTY)
    wait_until(lambda: qemu_pids(lab), 20, "the probe QEMU")
    (qemu,) = qemu_pids(lab)
    status = proc_status(qemu)
    probe_uid = pwd.getpwnam("vfiocaps-probe").pw_uid
    assert status["Uid"].split() == [str(probe_uid)] * 4, status["Uid"]
    assert "0" not in status["Gid"].split(), status["Gid"]
    assert "0" not in status.get("Groups", "").split()
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[capability_set], 16) == 0, (capability_set, status[capability_set])
    # Inherited from the daemon, which sets it on itself however it was started.
    assert status["NoNewPrivs"] == "1"
    argv = cmdline(qemu)
    lab.wait_states({FAULTY: "done"}, timeout=30)
    launched = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert launched, "the fake QEMU recorded no launch"
    assert argv[1:] in [entry for entry in launched]
    for entry in launched:
        for value in hostile:
            assert all(value not in arg for arg in entry), (value, entry)
        devices = [entry[i + 1] for i, arg in enumerate(entry) if arg == "-device"]
        for device in devices:
            if device.startswith("vfio-pci,sysfsdev="):
                sysfsdev = device.split(",")[1].removeprefix("sysfsdev=")
                assert sysfsdev.endswith("/" + FAULTY)
    print(f"probe QEMU status: Uid {status['Uid']} CapEff {status['CapEff']} "
          f"NoNewPrivs {status.get('NoNewPrivs')} Seccomp {status.get('Seccomp')}")  # fmt: skip


@pytest.mark.skipif(REAL_QEMU is None, reason="qemu-system-x86_64 is not installed")
async def test_real_qemu_probe_runs_without_privilege_under_seccomp(tmp_path: Path) -> None:
    """The bare self-test with the real QEMU, stopped at QMP ready to read its credentials."""
    from support.prober import ensure_probe_user
    from vfiocaps.config import Config
    from vfiocaps.prober import LaunchEvent, LaunchStage, Prober

    user = ensure_probe_user()
    seen: dict[str, str] = {}

    def observe(event: LaunchEvent) -> None:
        if event.stage is LaunchStage.QMP_READY:
            seen.update(proc_status(event.pid))
            seen["argv"] = json.dumps(cmdline(event.pid))

    tmp_path.chmod(0o755)
    config = Config(
        runtime_dir=tmp_path / "run",
        qemu_binary=Path(REAL_QEMU or ""),
        probe_user=user,
        probe_timeout=20.0,
    )
    report = await Prober(config, observer=observe).check_qemu()
    assert report.launches, report
    assert seen, "QEMU never reached QMP"
    if os.geteuid() == 0:
        uid = str(pwd.getpwnam(user).pw_uid)
        assert seen["Uid"].split() == [uid] * 4
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(seen[capability_set], 16) == 0, capability_set
    assert seen["NoNewPrivs"] == "1"
    assert seen["Seccomp"] == "2"
    argv = json.loads(seen["argv"])
    assert "-sandbox" in argv
    assert argv[argv.index("-sandbox") + 1].startswith("on,")
    print(f"real QEMU: Uid {seen['Uid']} CapEff {seen['CapEff']} NoNewPrivs 1 Seccomp 2")


def test_a_qemu_stopped_from_outside_is_killed_at_its_timeout(lab: Lab) -> None:
    """A probe QEMU stopped by someone else is killed on timeout even when never resumed."""
    pid, daemon = fault_lab(lab, {"pause_seconds": 30}, "--probe-timeout", "2")
    lab.host.add_instance("mtty", "mtty-1", uuid=FAULTY)
    wait_until(lambda: qemu_pids(lab), 20, "the probe QEMU")
    for qemu in qemu_pids(lab):
        os.kill(qemu, signal.SIGSTOP)
    lab.wait_states({FAULTY: "failed"}, timeout=30)
    assert_clean_after(lab, pid, daemon)
