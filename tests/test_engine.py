"""The engine through the real daemon: one probe per key, warm restarts, invalidation, backoff.

The host is umockdev (the kernel's sample drivers and vendor parents), the probes run the real
prober against the fake QEMU that speaks real QMP (no mdev can exist here), over a real bus.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time

import pytest

from support.daemon_lab import Lab, capabilities, manager_property
from support.harness import BUS_NAME, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)


def history_rows(lab: Lab) -> list[tuple[str, str, str]]:
    with sqlite3.connect(lab.directory / "cache" / "capabilities.sqlite") as db:
        return db.execute(
            "SELECT driver, type_id, outcome FROM probe_history ORDER BY id"
        ).fetchall()


def test_twenty_devices_of_two_types_cause_exactly_two_probes(lab: Lab) -> None:
    lab.host.build("mtty")
    daemon = lab.start()
    uuids = [lab.host.add_instance("mtty", "mtty-1") for _ in range(10)]
    uuids += [lab.host.add_instance("mtty", "mtty-2") for _ in range(10)]
    lab.wait_states(dict.fromkeys(uuids, "done"))
    assert manager_property(lab.bus, "ProbeCount") == 2
    assert manager_property(lab.bus, "DeviceCount") == 20
    caps = capabilities(lab.bus, uuids[-1])
    assert caps["Display"] == "none"
    assert caps["MigrationWithOptions"] == "supported"
    assert daemon.log().count("probed ") == 2
    time.sleep(0.5)
    assert sorted(history_rows(lab)) == [("mtty", "mtty-1", "ok"), ("mtty", "mtty-2", "ok")]


def test_restart_with_a_warm_cache_launches_no_qemu(lab: Lab) -> None:
    lab.host.build("samples")
    first = lab.start()
    uuids = {
        lab.host.add_instance("mtty", "mtty-1"): ("none", "unsupported", False),
        lab.host.add_instance("mdpy", "mdpy-hd"): ("region", "unsupported", False),
        lab.host.add_instance("mbochs", "mbochs-small"): ("dmabuf", "unsupported", True),
    }
    lab.wait_states(dict.fromkeys(uuids, "done"))
    assert manager_property(lab.bus, "ProbeCount") == 3
    assert first.stop() == 0
    second = lab.start(name="second")
    lab.wait_states(dict.fromkeys(uuids, "done"), timeout=20)
    assert manager_property(lab.bus, "ProbeCount") == 0
    for uuid, (display, migration, gl) in uuids.items():
        caps = capabilities(lab.bus, uuid)
        assert (caps["Display"], caps["Migration"], caps["GlRequired"]) == (display, migration, gl)
    assert "probed " not in second.log()


def test_driver_update_reprobes_exactly_the_affected_types(lab: Lab) -> None:
    lab.host.build("samples")
    daemon = lab.start()
    mdpy = lab.host.add_instance("mdpy", "mdpy-hd")
    mtty = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({mdpy: "done", mtty: "done"})
    assert manager_property(lab.bus, "ProbeCount") == 2
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--address", lab.bus.address, "--dest", BUS_NAME],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        lab.host.remove_instance(mtty)
        lab.host.reload_module("mtty", version="0.2")
        again = lab.host.add_instance("mtty", "mtty-1")
        lab.wait_states({again: "done", mdpy: "done"})
        assert manager_property(lab.bus, "ProbeCount") == 3
        caps = capabilities(lab.bus, again)
        assert caps["DriverVersion"] == "0.2"
        assert capabilities(lab.bus, mdpy)["ProbedAt"] > 0
        time.sleep(0.5)
    finally:
        monitor.terminate()
        output = monitor.communicate(timeout=10)[0]
    assert "CacheInvalidated ('mtty', '0.1', '0.2', uint32 1)" in output
    assert "CacheInvalidated ('mdpy'" not in output
    assert sorted(history_rows(lab)) == [
        ("mdpy", "mdpy-hd", "ok"),
        ("mtty", "mtty-1", "ok"),
        ("mtty", "mtty-1", "ok"),
    ]
    assert daemon.alive()


def test_a_failure_is_cached_and_retried_after_backoff(lab: Lab) -> None:
    lab.host.build("gvtg")
    lab.start("--probe-retry-seconds", "3")
    first = lab.host.add_instance("i915", "i915-GVTg_V5_4")
    lab.wait_states({first: "failed"})
    caps = capabilities(lab.bus, first)
    assert "KVM is required" in caps["LastError"]
    assert manager_property(lab.bus, "ProbeCount") == 1
    second = lab.host.add_instance("i915", "i915-GVTg_V5_4")
    lab.wait_states({second: "failed"})
    assert manager_property(lab.bus, "ProbeCount") == 1, "a cached failure must not re-probe"
    wait_until(lambda: manager_property(lab.bus, "ProbeCount") == 2, 15, "the retry", 0.2)
    with sqlite3.connect(lab.directory / "cache" / "capabilities.sqlite") as db:
        (failures, retry_at, probed_at) = db.execute(
            "SELECT failures, retry_at_us, probed_at_us FROM capabilities"
        ).fetchone()
    assert failures >= 1
    assert retry_at > probed_at


def test_a_busy_device_is_not_disturbed_and_its_sibling_answers(lab: Lab) -> None:
    lab.host.build("mtty")
    busy = "0b0b0b0b-0000-4000-8000-00000000b051"
    lab.overrides({"devices": {busy: {"busy": True}}})
    lab.start("--probe-retry-seconds", "60")
    lab.host.add_instance("mtty", "mtty-1", uuid=busy)
    lab.wait_states({busy: "busy"})
    assert "busy" in capabilities(lab.bus, busy)["ProbeState"]
    sibling = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({sibling: "done", busy: "done"})
    assert capabilities(lab.bus, busy)["Display"] == "none"


def test_a_corrupt_database_is_set_aside_and_rebuilt(lab: Lab) -> None:
    cache = lab.directory / "cache"
    cache.mkdir()
    garbage = os.urandom(32 * 1024)
    (cache / "capabilities.sqlite").write_bytes(garbage)
    lab.host.build("mtty")
    daemon = lab.start()
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({uuid: "done"})
    assert manager_property(lab.bus, "CacheState") == "ok"
    (aside,) = cache.glob("capabilities.sqlite.corrupt-*")
    assert aside.read_bytes() == garbage
    assert "moved to" in daemon.log()
