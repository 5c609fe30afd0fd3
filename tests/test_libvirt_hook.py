"""Probes yield to VMs: the libvirt hook holds a domain's devices in the real daemon (a running
probe is cut short, its QEMU reaped and its node given back before the hook returns; nothing is
cached), release brings the answer; the hook never fails a start, whatever the daemon does."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.daemon_lab import Lab, make_lab, manager_call
from support.harness import wait_until
from support.libvirt_hook import HOOK, domain_xml, run_hook
from support.prober import node_state
from support.reliability import daemon_pid, probe_leftovers, qemu_pids, records
from vfiocaps.engine.holds import Hold, ProbeGate
from vfiocaps.errors import BusyError, InvalidArgumentError
from vfiocaps.model import Device, DeviceKind

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

VM_DEVICE = "5a5a5a5a-0000-4000-8000-00000000f00d"
OTHER = "5a5a5a5a-0000-4000-8000-00000000beef"
DOMAIN_UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
XML = domain_xml("vm1", DOMAIN_UUID, mdevs=(VM_DEVICE,))


@pytest.fixture
def lab() -> Iterator[Lab]:
    yield from make_lab()


def group_node(lab: Lab, device_id: str) -> Path:
    link = lab.host.root / "sys/bus/mdev/devices" / device_id / "iommu_group"
    return lab.dev / "vfio" / os.path.basename(os.readlink(link))


def launches(argv_log: Path, device_id: str) -> int:
    lines = argv_log.read_text().splitlines()
    return sum(1 for line in lines if any(device_id in arg for arg in json.loads(line)))


def logged_argv(lab: Lab) -> Path:
    argv_log = lab.directory / "argv.log"
    argv_log.write_text("")
    argv_log.chmod(0o666)
    return argv_log


def test_prepare_cuts_a_running_probe_short_and_release_brings_the_answer(lab: Lab) -> None:
    lab.host.build("mtty")
    lab.overrides({"devices": {VM_DEVICE: {"fault": {"on": "realize", "pause_seconds": 60}}}})
    daemon = lab.start("--probe-settle-seconds", "0", "--probe-retry-seconds", "600")
    lab.host.add_instance("mtty", "mtty-1", uuid=VM_DEVICE)
    wait_until(lambda: qemu_pids(lab), 20, "the probe QEMU")
    node = group_node(lab, VM_DEVICE)
    wait_until(lambda: node_state(node)[0] != 0, 10, "the node lent to the probe user")

    hook = run_hook(lab.bus.address, "vm1", "prepare", "begin", XML)

    assert (hook.returncode, hook.stdout, hook.stderr) == (0, "", "")
    # The daemon's part (probe stopped, QEMU reaped, node given back) within 1 s; the hook's
    # whole run (a Python start and busctl's included) within its own bound.
    held = re.search(rf"domain vm1 holds {VM_DEVICE} \(([0-9.]+) s", daemon.log())
    assert held is not None, daemon.log()
    assert float(held.group(1)) < 1.0, held.group(0)
    assert hook.seconds < 3.0, f"the hook took {hook.seconds:.2f} s"
    print(f"hold answered in {held.group(1)} s; the hook ran {hook.seconds:.2f} s")
    # Before the hook returned: QEMU gone and reaped, the node given back, nothing left.
    assert qemu_pids(lab) == []
    assert node_state(node)[0] == 0
    assert probe_leftovers(daemon) == []
    states = lab.devices()[VM_DEVICE]
    assert states["ProbeState"] == "busy"
    assert "held by domain vm1" in states["LastError"]
    assert records(lab.directory / "cache" / "capabilities.sqlite") == []
    lab.overrides({})
    time.sleep(1.5)  # the domain runs: no probe
    assert qemu_pids(lab) == []
    assert lab.states()[VM_DEVICE] == "busy"

    release = run_hook(lab.bus.address, "vm1", "release", "end", XML)

    assert (release.returncode, release.stderr) == (0, "")
    lab.wait_states({VM_DEVICE: "done"}, timeout=30)  # nobody asked again
    assert f"domain vm1 holds {VM_DEVICE}" in daemon.log()


def test_a_held_new_instance_is_not_probed_until_release(lab: Lab) -> None:
    """The stack creates an instance and starts a VM on it at once: inside the settle time
    the hook holds it, so no probe ever opens its group while the domain runs."""
    lab.host.build("mtty")
    argv_log = logged_argv(lab)
    lab.overrides({"argv_log": str(argv_log)})
    lab.start("--probe-settle-seconds", "2")
    lab.host.add_instance("mtty", "mtty-1", uuid=VM_DEVICE)
    hook = run_hook(lab.bus.address, "vm1", "prepare", "begin", XML)
    assert (hook.returncode, hook.stderr) == (0, "")
    time.sleep(3)
    assert launches(argv_log, VM_DEVICE) == 0
    assert lab.states()[VM_DEVICE] == "busy"
    lab.host.add_instance("mtty", "mtty-1", uuid=OTHER)  # not held: probed after settling
    lab.wait_states({OTHER: "done"}, timeout=30)
    assert launches(argv_log, VM_DEVICE) == 0

    assert run_hook(lab.bus.address, "vm1", "release", "end", XML).returncode == 0
    lab.wait_states({VM_DEVICE: "done"}, timeout=30)


def test_a_new_instance_settles_before_its_probe(lab: Lab) -> None:
    lab.host.build("mtty")
    argv_log = logged_argv(lab)
    lab.overrides({"argv_log": str(argv_log)})
    lab.start("--probe-settle-seconds", "3")
    created = time.monotonic()
    lab.host.add_instance("mtty", "mtty-1", uuid=VM_DEVICE)
    wait_until(lambda: launches(argv_log, VM_DEVICE) > 0, 30, "the probe")
    assert time.monotonic() - created >= 3.0
    lab.wait_states({VM_DEVICE: "done"}, timeout=30)


def test_the_hook_passes_pci_functions_and_ignores_other_operations(lab: Lab) -> None:
    lab.host.build("mtty")
    daemon = lab.start()
    xml = domain_xml("vm2", DOMAIN_UUID, pci=("0000:65:00.4",))
    for operation in (("start", "begin"), ("started", "begin"), ("stopped", "end")):
        assert run_hook(lab.bus.address, "vm2", *operation, xml).stderr == ""
    assert "domain vm2" not in daemon.log()
    hook = run_hook(lab.bus.address, "vm2", "prepare", "begin", xml)
    assert (hook.returncode, hook.stderr) == (0, "")
    wait_until(lambda: "domain vm2 holds 0000:65:00.4" in daemon.log(), 5, "the hold logged")
    released = manager_call(lab.bus, "ReleaseDevices", "s", DOMAIN_UUID.upper())
    assert released == [[]]  # no such live device: nothing to release, and no error
    assert "domain vm2 released" in daemon.log()


@pytest.mark.parametrize(
    ("what", "stdin"),
    [
        ("doctype", "<!DOCTYPE d [<!ENTITY x 'y'>]><domain><uuid>&x;</uuid></domain>"),
        ("not xml", "<domain><devices>"),
        ("too long", "<domain>" + " " * (4 * 1024 * 1024 + 1)),
        ("bad pci", domain_xml("vm", DOMAIN_UUID).replace(
            "</devices>",
            "<hostdev mode='subsystem' type='pci'><source><address bus='0x1ff'/></source>"
            "</hostdev></devices>",
        )),
    ],
)  # fmt: skip
def test_unusable_xml_is_one_line_and_exit_0(lab: Lab, what: str, stdin: str) -> None:
    hook = run_hook(lab.bus.address, "vm", "prepare", "begin", stdin)
    assert hook.returncode == 0, what
    assert hook.stdout == ""
    assert len(hook.stderr.splitlines()) == 1, hook.stderr
    assert "unusable XML" in hook.stderr


def test_the_hook_never_fails_a_start_whatever_the_daemon_does(lab: Lab) -> None:
    lab.host.build("mtty")
    # Absent: nobody owns the name, and the hook does not start the daemon.
    absent = run_hook(lab.bus.address, "vm1", "prepare", "begin", XML)
    assert (absent.returncode, absent.stdout) == (0, "")
    assert len(absent.stderr.splitlines()) == 1
    assert "cannot hold" in absent.stderr
    assert absent.seconds < 3.0
    # Refuses: a domain UUID the daemon rejects.
    daemon = lab.start()
    bogus = XML.replace(DOMAIN_UUID, "not-a-uuid")
    refused = run_hook(lab.bus.address, "vm1", "prepare", "begin", bogus)
    assert refused.returncode == 0
    assert len(refused.stderr.splitlines()) == 1
    assert "not a domain UUID" in refused.stderr
    # Hangs: the daemon stopped; the wait is bounded.
    pid = daemon_pid(daemon)
    os.kill(pid, signal.SIGSTOP)
    try:
        hung = run_hook(lab.bus.address, "vm1", "prepare", "begin", XML)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (hung.returncode, hung.stdout) == (0, "")
    assert len(hung.stderr.splitlines()) == 1
    assert "cannot hold" in hung.stderr
    assert hung.seconds < 4.5, f"the hook waited {hung.seconds:.1f} s"
    assert daemon.alive()


def test_the_hook_is_installed_executable_and_runs_without_the_project() -> None:
    assert os.access(HOOK, os.X_OK)
    first = HOOK.read_text().splitlines()[0]
    assert first == "#!/usr/bin/python3 -I"  # isolated: no site packages, no environment


def test_a_temporary_instance_answers_for_a_new_users_instance(lab: Lab) -> None:
    """With --prefer-temporary-instances, a user's new instance is never opened by a probe
    when its type has room: a temporary instance is probed, removed, and its answer shared."""
    lab.host.build("mtty")
    argv_log = logged_argv(lab)
    lab.overrides({"argv_log": str(argv_log)})
    daemon = lab.start("--prefer-temporary-instances", "--probe-settle-seconds", "0")
    lab.host.add_instance("mtty", "mtty-1", uuid=VM_DEVICE)
    lab.wait_states({VM_DEVICE: "done"}, timeout=60)
    assert launches(argv_log, VM_DEVICE) == 0
    assert argv_log.read_text().strip(), "no probe launched at all"
    wait_until(lambda: list(lab.devices()) == [VM_DEVICE], 30, "the temporary instance removed")
    assert "no answer from a temporary instance" not in daemon.log()


def test_holds_are_bounded_and_a_release_keeps_another_domains_hold() -> None:
    gate = ProbeGate(max_domains=2, max_devices=2)
    device = Device(
        DeviceKind.MDEV, VM_DEVICE, f"/sys/devices/x/{VM_DEVICE}", "x", "t", iommu_group="7"
    )
    sibling = Device(
        DeviceKind.PCI, "0000:65:00.5", "/sys/devices/p", "p", "10de:2330", iommu_group="7"
    )
    gate.hold(Hold("a", "vm-a", frozenset({VM_DEVICE}), frozenset({"7"})))
    gate.hold(Hold("b", "vm-b", frozenset({VM_DEVICE})))
    with pytest.raises(BusyError, match="release the holds"):
        gate.hold(Hold("c", "vm-c", frozenset()))
    with pytest.raises(InvalidArgumentError, match="at most 2 devices"):
        gate.hold(Hold("a", "vm-a", frozenset({"1", "2", "3"})))
    assert gate.blocks(sibling) == "held by domain vm-a; probed when it releases the device"
    assert gate.release("a") is not None
    assert gate.blocks(device) == "held by domain vm-b; probed when it releases the device"
    assert gate.blocks(sibling) is None  # the group was vm-a's alone
    assert gate.release("b") is not None
    assert gate.blocks(device) is None
    assert gate.release("b") is None
    assert len(gate) == 0


def test_a_probe_whose_node_a_vm_takes_is_not_an_answer(lab: Lab) -> None:
    """Without the hook, libvirt labels the group node for its VM while a probe runs, and the
    probe's QEMU cannot open it ("Permission denied"). That says nothing of the type: the device
    is busy, nothing is cached, and it is probed again by itself."""
    lab.host.build("mtty")
    daemon = lab.start("--probe-settle-seconds", "2", "--probe-retry-seconds", "2")
    lab.host.add_instance("mtty", "mtty-1", uuid=VM_DEVICE)
    node = group_node(lab, VM_DEVICE)
    fault = {"fault": {"on": "realize", "pause_seconds": 3}, "open_node": str(node)}
    lab.overrides({"devices": {VM_DEVICE: fault}})
    wait_until(lambda: qemu_pids(lab) and node_state(node)[0] != 0, 20, "the probe's grant")
    os.chown(node, 4242, 4242)  # what libvirt's DAC labelling does for the VM's QEMU
    wait_until(lambda: "Permission denied" in daemon.log(), 20, "the probe's failed open")
    wait_until(lambda: not qemu_pids(lab), 20, "the probe to end")
    time.sleep(1)  # the cache writes behind
    assert lab.states()[VM_DEVICE] == "busy"
    assert "was given to uid 4242 during the probe" in daemon.log()
    assert records(lab.directory / "cache" / "capabilities.sqlite") == []
    os.chown(node, 0, 0)  # the VM stopped: libvirt gave the node back
    lab.wait_states({VM_DEVICE: "done"}, timeout=30)
