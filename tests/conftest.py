"""Shared fixtures (a private bus per test, a helper to start the daemon on it) and the tables of
the test modules that must run alone (``serial``) and of the quick in-process ones (``quick``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from support.callers import polkitd, shared_bus
from support.daemon_lab import Lab, make_lab
from support.harness import DaemonFactory, DaemonProcess, PrivateBus

__all__ = ["polkitd", "shared_bus"]  # fixtures of support.callers, for every test module

# Modules that are not parallel-safe, and why: scripts/run-tests runs them one at a time after
# the parallel phase (``-m serial``). Everything else runs on several xdist workers at once.
SERIAL = {
    "test_root_probe_user": "adds and removes system users and groups",
    "test_prober_fake": "compares the host's /dev/kvm before and after a probe",
    "test_prober_qemu": "times the real QEMU on the host's /dev/kvm",
    "test_reliability_bus": "measures how long the daemon takes under a flood of calls",
    "test_reliability_events": "measures how long an event storm takes",
    "test_reliability_qemu": "measures time and memory of hung and crashing QEMUs",
    "test_memory": "measures the daemon's memory",
    "test_bus_backpressure": "a flood against a deadline",
    "test_foundation": "watchdog pings at a fixed period",
    "test_discovery_overflow": "overflows a netlink socket, which needs a slow enough reader",
}
# The in-process and unit tests: ``scripts/run-tests --quick`` (``-m quick``), the inner loop.
QUICK = {
    "test_bootid",
    "test_discovery_sriov",
    "test_discovery_sysfs",
    "test_domainxml",
    "test_engine_inprocess",
    "test_engine_parts",
    "test_errors_tree",
    "test_fingerprint",
    "test_ids",
    "test_nfd_labels",
    "test_notify",
    "test_private_members",
    "test_prober_gl_transcripts",
    "test_prober_plan",
    "test_prober_transcripts",
    "test_state_records",
    "test_store",
    "test_vfiofeatures",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of the modules named in SERIAL and QUICK."""
    for item in items:
        module = item.path.stem
        if module in SERIAL:
            item.add_marker(pytest.mark.serial)
        if module in QUICK:
            item.add_marker(pytest.mark.quick)


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    bus = PrivateBus(tmp_path / "bus").start()
    try:
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def start_daemon(private_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonFactory]:
    started: list[DaemonProcess] = []

    def start(
        *args: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        name: str = "daemon",
        bus: PrivateBus | None = None,
    ) -> DaemonProcess:
        daemon = DaemonProcess(
            bus=bus or private_bus,
            workdir=tmp_path / name,
            args=args,
            env=dict(env or {}),
            wrapper=wrapper,
        )
        started.append(daemon)
        return daemon.start(wait=wait)

    try:
        yield start
    finally:
        for daemon in started:
            if daemon.alive():
                daemon.stop()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A daemon host: umockdev sysfs, the fake QEMU, /dev/vfio nodes, a private bus."""
    yield from make_lab()
