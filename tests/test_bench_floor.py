"""The floor of the daemon's start: the same interpreter, options and dbus-fast as its launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus

from support.harness import REPO, PrivateBus

FLOOR = REPO / "bench" / "name_floor.py"
NAME = "org.vfiocaps.BenchFloorTest"


@pytest.fixture
def floor_unit(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(REPO))
    from bench import floor_unit

    return floor_unit


@pytest.fixture
def bus(tmp_path: Path) -> Any:
    private = PrivateBus(tmp_path / "bus").start()
    try:
        yield private
    finally:
        private.stop()


def test_the_floor_uses_the_interpreter_line_of_the_installed_launcher(
    floor_unit: Any, tmp_path: Path
) -> None:
    """The launcher as ``make install`` writes it, not a copy of its format."""
    directory = tmp_path / "share"
    (directory / "vfiocaps-0.dist-info").mkdir(parents=True)
    (directory / "vfiocaps-0.dist-info" / "entry_points.txt").write_text(
        "[console_scripts]\nvfiocapsd = vfiocaps.daemon:main\n"
    )
    subprocess.run(
        [sys.executable, str(REPO / "scripts/write-launchers"), str(directory),
         str(tmp_path / "bin"), "/usr/bin/python3"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    interpreter = floor_unit.launcher_interpreter(tmp_path / "bin" / "vfiocapsd")
    assert interpreter == ["/usr/bin/python3", "-I"]
    command = floor_unit.floor_command("floor-0", interpreter, "org.vfiocaps")
    assert command[command.index("/usr/bin/python3") :] == [
        "/usr/bin/python3", "-I", str(FLOOR), "system", "org.vfiocaps",
        str(floor_unit.library_dir()),
    ]  # fmt: skip
    (tmp_path / "binary").write_bytes(b"\x7fELF\x02\x01")
    with pytest.raises(RuntimeError, match="no #! line"):
        floor_unit.launcher_interpreter(tmp_path / "binary")


def test_isolated_floor_without_the_library_directory_ends_at_once(bus: Any) -> None:
    """Without site packages (``-S``: like a service's Python, which does not see the package's
    private directory) the floor cannot import dbus-fast: it ends at once, saying so."""
    isolated = [sys.executable, "-I", "-S", str(FLOOR), bus.address, NAME]
    lost = subprocess.run(isolated, capture_output=True, text=True, timeout=120, check=False)
    assert lost.returncode == 1
    assert "No module named 'dbus_fast'" in lost.stderr


async def test_isolated_floor_owns_the_name_with_the_library_directory(
    floor_unit: Any, bus: Any
) -> None:
    """Given the directory the launcher puts first on ``sys.path``, the isolated floor owns the
    name and stops cleanly on SIGTERM."""
    from bench.name_timing import seconds_to_name

    isolated = [sys.executable, "-I", "-S", str(FLOOR), bus.address, NAME]

    connection = await MessageBus(bus_address=bus.address).connect()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        command = [*isolated, str(floor_unit.library_dir())]
        seconds = await seconds_to_name(
            connection, NAME, lambda: processes.append(subprocess.Popen(command)), 120
        )
        assert 0 < seconds < 120
        assert processes[0].poll() is None
    finally:
        connection.disconnect()
        for process in processes:
            process.terminate()
            assert process.wait(30) == 0
