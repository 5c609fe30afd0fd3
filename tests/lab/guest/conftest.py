"""Guest-side lab fixtures: the installed daemon, the sample drivers, and the capability table."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import (
    SAMPLE_DRIVERS,
    SAMPLE_TYPES,
    CapabilityTable,
    Daemon,
    MdevLab,
    SignalWatch,
    wait_for,
)
from libvirtkit import DOMAIN_PREFIX, Libvirt

TABLE = CapabilityTable()
LIBVIRT = Libvirt()


def results_dir() -> Path | None:
    """The results share, when running inside the lab."""
    value = os.environ.get("VFIOCAPS_LAB_RESULTS")
    return Path(value) if value else None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--races",
        type=int,
        default=1,
        metavar="N",
        help="rounds of VM-start races in test_99_vm_race (default 1; 5 for the figures in "
        "docs/libvirt.md): with the hook one VM on every sample driver per round, without it "
        "one VM per driver",
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each test phase's time, appended to durations.tsv in the results share as it ends: a
    guest stopped by the lab's time limit still says where its time went."""
    results = results_dir()
    if results is None or report.when not in ("setup", "call", "teardown"):
        return
    with (results / "durations.tsv").open("a") as out:
        out.write(f"{report.nodeid}\t{report.when}\t{report.duration:.2f}\t{report.outcome}\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    results = results_dir()
    if results is None:
        return
    (results / "capabilities.json").write_text(json.dumps(TABLE.rows, indent=2, sort_keys=True))
    (results / "capabilities.md").write_text(TABLE.markdown())
    if LIBVIRT.log:
        (results / "libvirt.md").write_text(LIBVIRT.markdown())
        (results / "libvirt.json").write_text(json.dumps(LIBVIRT.log, indent=2))


@pytest.fixture(scope="session")
def table() -> CapabilityTable:
    return TABLE


@pytest.fixture(scope="session")
def signal_watch() -> Iterator[SignalWatch]:
    watch = SignalWatch()
    try:
        yield watch
    finally:
        watch.close()


@pytest.fixture(scope="session")
def daemon(signal_watch: SignalWatch) -> Daemon:
    service = os.environ.get("VFIOCAPS_LAB_SERVICE", "vfiocapsd.service")
    install_status = os.environ.get("VFIOCAPS_LAB_INSTALL_STATUS", "0")
    found = Daemon(service)
    if install_status != "0":
        pytest.fail(f"the project did not install (status {install_status}); see install.log")
    try:
        wait_for(
            lambda: found.is_serving() or found.has_failed(), 60, "vfiocapsd on the system bus"
        )
        if not found.is_serving():
            raise AssertionError("the unit failed")
    except AssertionError:
        pytest.fail(f"vfiocapsd does not serve org.vfiocaps:\n{found.journal()}")
    return found


@pytest.fixture(scope="session")
def mdevs() -> MdevLab:
    lab = MdevLab()
    for module in SAMPLE_DRIVERS:
        lab.load(module)
    return lab


@pytest.fixture(scope="session")
def samples(daemon: Daemon, mdevs: MdevLab) -> dict[str, str]:
    """One instance of each type in SAMPLE_TYPES, created while the daemon runs: {type: uuid}."""
    created = {}
    for module, type_ids in SAMPLE_TYPES.items():
        available = mdevs.types(module)
        for type_id in type_ids:
            assert type_id in available, f"{module} offers {sorted(available)}, not {type_id}"
            created[type_id] = mdevs.create(module, type_id)
    return created


@pytest.fixture(scope="session")
def libvirt() -> Iterator[Libvirt]:
    """libvirtd running, answering on qemu:///system; every lab domain removed afterwards.
    Restarted, not only started: run-in-guest may have started it before the package installed
    the hook, and libvirtd reads its hooks when it starts."""
    subprocess.run(["systemctl", "restart", "libvirtd"], check=True, timeout=120)
    answered = wait_for(
        lambda: LIBVIRT.virsh("version", check="libvirt up", timeout=60).ok,
        120,
        "libvirtd to answer",
        2.0,
    )
    assert answered
    try:
        yield LIBVIRT
    finally:
        listed = LIBVIRT.virsh("list", "--all", "--name", check="cleanup", timeout=60)
        for name in listed.output.split():
            if name.startswith(DOMAIN_PREFIX):
                LIBVIRT.remove(name)
