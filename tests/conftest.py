"""Shared fixtures (a private bus per test, a helper to start the daemon on it), and the markers
``serial`` and ``quick`` given to the modules that support.phases names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from support.callers import polkitd, shared_bus
from support.daemon_lab import Lab, make_lab
from support.harness import DaemonFactory, DaemonProcess, PrivateBus
from support.phases import PROCESS_FIXTURES, QUICK, SERIAL

__all__ = ["polkitd", "shared_bus"]  # fixtures of support.callers, for every test module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of the modules named in SERIAL and QUICK (in those, only the tests that
    start no daemon)."""
    for item in items:
        module = item.path.stem
        if module in SERIAL:
            item.add_marker(pytest.mark.serial)
        if module in QUICK and not PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
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
