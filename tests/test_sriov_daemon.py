"""SR-IOV through the real daemon: VF profiles and variant-driver VFs listed, probed by host
address, a profile probed on a free VF and cleared again, a VM's VF left alone, a crash's
leftover profile cleared at the next start. The NVIDIA driver sends no uevent for a profile
(set by the daemon or by another tool): the fixture sends none either."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from support.daemon_lab import Lab, capabilities, list_types, make_lab, manager_property
from support.harness import BUS_NAME, ROOT_PATH, busctl, wait_until
from support.nfd_format import read_labels
from support.umockdev_sriov import H100, L40S, MLX5, XE, SriovMockHost
from vfiocaps.nfdlabels import LABEL_PREFIX

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

MANAGER = "org.vfiocaps1.Manager"


@pytest.fixture
def lab() -> Iterator[Lab]:
    yield from make_lab(SriovMockHost)


def host(lab: Lab) -> SriovMockHost:
    assert isinstance(lab.host, SriovMockHost)
    return lab.host


def probe_type(lab: Lab, parent: str, type_id: str, check: bool = True) -> Any:
    out = busctl(
        lab.bus.address, "call", "--json=short", "--timeout=110", BUS_NAME, ROOT_PATH, MANAGER,
        "ProbeType", "ss", parent, type_id, timeout=120, check=check,
    )  # fmt: skip
    if not check:
        return out
    return {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}


def profiles_of(lab: Lab) -> dict[str, str]:
    return {H100.vf_address(i): host(lab).current_profile(H100.vf_address(i)) for i in range(4)}


def test_coldplug_lists_both_worlds_and_probes_variant_vfs_by_host_address(lab: Lab) -> None:
    argv_log = lab.directory / "argv.log"
    argv_log.write_text("")
    argv_log.chmod(0o666)
    lab.overrides({"argv_log": str(argv_log)})
    for key in ("h100", "xe", "mlx5"):
        host(lab).build_sriov(key)
    lab.start()
    xe_vfs = [XE.vf_address(0), XE.vf_address(1)]
    mlx5_vf = MLX5.vf_address(0)
    lab.wait_states({xe_vfs[0]: "done", xe_vfs[1]: "done", mlx5_vf: "done"})
    listed = list_types(lab.bus)
    # Each free H100 VF has vfio-dev (nvidia.ko registers it), yet none is a device: no type
    # 10de:2331, and only the Xe and mlx5 VFs count.
    assert {key: t["Kind"] for key, t in listed.items()} == {
        (H100.address, "1060"): "vf-profile",
        (H100.address, "1061"): "vf-profile",
        (H100.address, "1062"): "vf-profile",
        (H100.address, "1070"): "vf-profile",
        (XE.address, "8086:e211"): "pci",
        (MLX5.address, "15b3:101e"): "pci",
    }
    assert manager_property(lab.bus, "DeviceCount") == 3
    assert listed[(H100.address, "1070")]["Requires"] == "gpu-instance"
    assert listed[(H100.address, "1061")]["Requires"] == ""
    profile = listed[(H100.address, "1061")]
    assert (profile["Name"], profile["AvailableInstances"], profile["Instances"]) == (
        "NVIDIA H100-40C",
        4,
        0,
    )
    assert (profile["Driver"], profile["DriverVersion"]) == ("nvidia", "570.133.10")
    assert listed[(XE.address, "8086:e211")]["Instances"] == 2
    # xe-vfio-pci: stop-copy and P2P without DMA logging; mlx5: device dirty tracking.
    for device in xe_vfs:
        caps = capabilities(lab.bus, device)
        assert (caps["Display"], caps["Migration"]) == ("none", "unsupported"), caps
        assert caps["MigrationWithOptions"] == "supported", caps
    caps = capabilities(lab.bus, mlx5_vf)
    assert (caps["Display"], caps["Migration"]) == ("none", "supported"), caps
    # The two Xe VFs share one key: one probe for them, one for the mlx5 VF.
    assert manager_property(lab.bus, "ProbeCount") == 2
    launched = [json.loads(line) for line in argv_log.read_text().splitlines()]
    devices = [argv[argv.index("-device") + 1] for argv in launched if "-device" in argv]
    devices = [d for d in devices if d != "vfio-pci,help"]
    assert devices
    assert all("host=" in d and "sysfsdev=" not in d for d in devices), devices
    named = {d.split("host=")[1].split(",")[0] for d in devices}
    assert mlx5_vf in named
    assert named <= {*xe_vfs, mlx5_vf}
    out = subprocess.run(
        [sys.executable, "-m", "vfiocaps.ctl", "--bus-address", lab.bus.address, "types"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.splitlines()[0].split()[0] == "KIND"
    assert any(
        line.startswith("vf-profile") and "NVIDIA H100-80C" in line for line in out.splitlines()
    )
    assert any(line.startswith("pci") and "15b3:101e" in line for line in out.splitlines())


def test_hotplug_of_vfs_and_a_profile_set_and_cleared(lab: Lab) -> None:
    host(lab).build_sriov("h100", vfs=0)
    daemon = lab.start("--profile-scan-seconds", "1")
    assert not list_types(lab.bus)
    host(lab).enable_vfs("h100", 4)
    wait_until(lambda: len(list_types(lab.bus)) == 4, 20, "the profiles of the new VFs")
    vf = H100.vf_address(2)
    host(lab).set_profile(vf, "1062")  # by another tool: no uevent
    lab.wait_states({vf: "done"})
    device = lab.devices()[vf]
    assert (device["TypeId"], device["TypeName"], device["Parent"]) == (
        "1062",
        "NVIDIA H100-80C",
        H100.address,
    )
    # An 80C fills the card: every profile stays listed, none can be made.
    full = list_types(lab.bus)
    assert {key[1]: t["AvailableInstances"] for key, t in full.items()} == {
        "1060": 0,
        "1061": 0,
        "1062": 0,
        "1070": 0,
    }
    assert (full[(H100.address, "1062")]["Instances"], full[(H100.address, "1062")]["Probed"]) == (
        1,
        True,
    )
    host(lab).set_profile(vf, "0")
    wait_until(lambda: vf not in lab.devices(), 20, "the VF to go with its profile")
    wait_until(
        lambda: {t["AvailableInstances"] for t in list_types(lab.bus).values()} == {4},
        20,
        "room for every profile again",
    )
    # The answer stays cached for the profile: known before any VF takes it again.
    assert list_types(lab.bus)[(H100.address, "1062")]["Probed"] is True
    host(lab).disable_vfs("h100")
    wait_until(lambda: not list_types(lab.bus), 20, "the profiles to go with the VFs")
    assert "event ParentUnregistered parent=0000:41:00.0" in daemon.log()


def test_a_profile_set_by_another_tool_is_seen_within_the_default_interval(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    lab.start()
    vf = H100.vf_address(1)
    started = time.monotonic()
    host(lab).set_profile(vf, "1060")
    wait_until(lambda: vf in lab.devices(), 12, "the VF with its profile", 0.1)
    assert time.monotonic() - started < 10.0
    # The card is homogeneous now: 1060 on the three free VFs, the others kept, with no room.
    listed = list_types(lab.bus)
    assert {key[1]: t["AvailableInstances"] for key, t in listed.items()} == {
        "1060": 3,
        "1061": 0,
        "1062": 0,
        "1070": 0,
    }


def test_refresh_finds_a_profile_set_a_moment_ago(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    lab.start("--profile-scan-seconds", "600")  # no periodic pass in this test's time
    vf = H100.vf_address(3)
    host(lab).set_profile(vf, "1061")
    out = busctl(
        lab.bus.address, "call", "--json=short", BUS_NAME, ROOT_PATH, MANAGER, "Refresh",
        "s", vf, timeout=120,
    )  # fmt: skip
    answer = {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}
    assert answer["Display"] == "none"
    assert lab.devices()[vf]["TypeId"] == "1061"


def test_any_uevent_of_the_card_looks_at_every_profile_at_once(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    lab.start("--profile-scan-seconds", "600")  # no periodic pass in this test's time
    vf = H100.vf_address(2)
    host(lab).set_profile(vf, "1062")  # silent
    time.sleep(1.0)
    assert vf not in lab.devices()
    host(lab).call("uevent", devpath=H100.devpath, action="change")  # as udevadm trigger
    wait_until(lambda: vf in lab.devices(), 5, "the VF seen with the card's uevent")


def test_a_mig_backed_profile_is_named_not_probed(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    daemon = lab.start()
    out = probe_type(lab, H100.address, "1070", check=False)
    assert out.returncode != 0
    assert "org.vfiocaps1.Error.NeedsGpuInstance" in out.stderr or "GPU instance" in out.stderr
    assert "set profile 1070" not in daemon.log()
    assert set(profiles_of(lab).values()) == {"0"}
    assert manager_property(lab.bus, "ProbeCount") == 0


def test_one_id_on_two_card_models_is_two_types_two_probes_two_labels(lab: Lab) -> None:
    features = lab.directory / "features.d"
    host(lab).build_sriov("h100")
    host(lab).build_sriov("l40s")
    lab.start(f"--nfd-labels={features}")
    listed = list_types(lab.bus)
    assert listed[(H100.address, "1061")]["Name"] == "NVIDIA H100-40C"
    assert listed[(L40S.address, "1061")]["Name"] == "NVIDIA L40S-24Q"
    probe_type(lab, H100.address, "1061")
    probe_type(lab, L40S.address, "1061")
    # Not one cached answer for both: each model's profile is probed.
    assert manager_property(lab.bus, "ProbeCount") == 2
    path = features / "vfiocaps"
    prefix = LABEL_PREFIX + "/"

    def labels() -> dict[str, str]:
        return read_labels(path) if path.exists() else {}

    wanted = {prefix + "NVIDIA-H100-40C.migration", prefix + "NVIDIA-L40S-24Q.migration"}
    wait_until(lambda: wanted <= labels().keys(), 20, "a label per profile name")
    assert not any(name.startswith(prefix + "1061.") for name in labels())


def test_probe_type_sets_a_profile_probes_and_clears_it(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    daemon = lab.start()
    answer = probe_type(lab, H100.address, "1061")
    assert (answer["Kind"], answer["Probed"]) == ("vf-profile", True)
    # NVIDIA's vendor-VFIO driver: stop-copy only, no DMA logging.
    assert (answer["Display"], answer["Migration"]) == ("none", "unsupported")
    assert answer["MigrationWithOptions"] == "supported"
    wait_until(lambda: set(profiles_of(lab).values()) == {"0"}, 20, "the profile cleared")
    wait_until(lambda: manager_property(lab.bus, "DeviceCount") == 0, 20, "the VF gone")
    log = daemon.log()
    assert f"set profile 1061 on {H100.vf_address(0)} for a probe" in log
    assert f"cleared profile 1061 from {H100.vf_address(0)}" in log
    runtime = lab.directory / "daemon" / "run" / "profiles"
    assert not list(runtime.glob("*.json"))
    # Answered from the cache the second time: no profile set again.
    probe_type(lab, H100.address, "1061")
    assert daemon.log().count("set profile 1061") == 1
    assert manager_property(lab.bus, "ProbeCount") == 1
    unknown = probe_type(lab, H100.address, "9999", check=False)
    assert unknown.returncode != 0
    assert "9999" in unknown.stderr


def test_a_vf_held_by_a_vm_is_never_touched(lab: Lab) -> None:
    vm_vf = H100.vf_address(0)
    lab.overrides({"devices": {vm_vf: {"busy": True}}})
    host(lab).build_sriov("h100")
    host(lab).set_profile(vm_vf, "1060")  # the VM's profile, set before the daemon starts
    daemon = lab.start()
    lab.wait_states({vm_vf: "busy"})
    answer = probe_type(lab, H100.address, "1060")
    assert answer["Probed"] is True
    assert f"set profile 1060 on {H100.vf_address(1)} for a probe" in daemon.log()
    wait_until(lambda: profiles_of(lab)[H100.vf_address(1)] == "0", 20, "the probe's VF cleared")
    assert profiles_of(lab)[vm_vf] == "1060"
    assert f"on {vm_vf} for a probe" not in daemon.log()
    # The VM's VF gets the answer learned on the other VF (same profile, same key), untouched.
    assert lab.states()[vm_vf] == "done"


def test_a_profile_left_by_a_killed_daemon_is_cleared_at_the_next_start(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    vf = H100.vf_address(0)
    # QEMU hangs at the device, so the daemon dies with the profile set.
    lab.overrides({"devices": {vf: {"fault": {"on": "realize", "pause_seconds": 8}}}})
    daemon = lab.start()
    call = subprocess.Popen(
        ["busctl", f"--address={lab.bus.address}", "--timeout=60", "call", BUS_NAME, ROOT_PATH,
         MANAGER, "ProbeType", "ss", H100.address, "1062"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: profiles_of(lab)[vf] == "1062", 30, "the profile set for the probe")
        wait_until(lambda: "probing" in lab.states().get(vf, ""), 30, "the probe running")
        daemon.stop(signal.SIGKILL)
    finally:
        call.wait(70)
    assert profiles_of(lab)[vf] == "1062"  # left behind
    lab.overrides({})
    again = lab.start()
    wait_until(lambda: profiles_of(lab)[vf] == "0", 20, "the leftover cleared")
    assert "set by an earlier vfiocapsd; clearing it" in again.log()
    assert vf not in lab.devices()


def test_a_daemon_stopped_during_a_profile_probe_clears_the_profile(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    vf = H100.vf_address(0)
    lab.overrides({"devices": {vf: {"fault": {"on": "realize", "pause_seconds": 8}}}})
    daemon = lab.start()
    call = subprocess.Popen(
        ["busctl", f"--address={lab.bus.address}", "--timeout=60", "call", BUS_NAME, ROOT_PATH,
         MANAGER, "ProbeType", "ss", H100.address, "1060"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: profiles_of(lab)[vf] == "1060", 30, "the profile set for the probe")
        wait_until(lambda: "probing" in lab.states().get(vf, ""), 30, "the probe running")
        daemon.stop(signal.SIGTERM)
    finally:
        call.wait(70)
    assert profiles_of(lab)[vf] == "0", daemon.log()[-3000:]
    assert f"cleared profile 1060 from {vf}" in daemon.log()
    assert not list((lab.directory / "daemon" / "run" / "profiles").glob("*.json"))


def test_opt_in_probes_every_profile_on_a_free_vf_and_clears_each(lab: Lab) -> None:
    host(lab).build_sriov("h100")
    daemon = lab.start("--probe-types-without-instances")

    def settled() -> bool:
        listed = list_types(lab.bus)
        cleared = set(profiles_of(lab).values()) == {"0"}
        probed = {key[1] for key, t in listed.items() if t["Probed"]}
        return cleared and probed == {"1060", "1061", "1062"}

    try:
        wait_until(settled, 120, "every profile probed and cleared", 0.5)
    except AssertionError as err:
        raise AssertionError(f"{err}; the daemon's log:\n{daemon.log()[-6000:]}") from err
    assert manager_property(lab.bus, "ProbeCount") == 3
    # The MIG-backed one needs a GPU instance first: never set, never probed.
    assert list_types(lab.bus)[(H100.address, "1070")]["Probed"] is False
    assert "set profile 1070" not in daemon.log()
    for number in ("1060", "1061", "1062"):
        assert f"cleared profile {number} from" in daemon.log()
    assert not list((lab.directory / "daemon" / "run" / "profiles").glob("*.json"))
