"""Child processes end whole: what a child leaves in its process group is killed also when the
child exits by itself, and a caller cancelled while a child is stopped stays cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from support.harness import wait_until
from vfiocaps.process import ManagedProcess, ProcessSpec, run_command

LEAVE_A_CHILD = 'sleep 300 & echo $! > "$0"; exit 0'  # the grandchild keeps stderr open


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


async def test_a_child_that_exits_by_itself_takes_its_process_group_along(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "left"
    async with ManagedProcess(ProcessSpec(("sh", "-c", LEAVE_A_CHILD, str(pidfile)))) as child:
        result = await child.wait()
    assert result.returncode == 0
    left = int(pidfile.read_text())
    wait_until(lambda: gone(left), 5, "the process the child left behind to be killed")


async def test_a_short_command_takes_its_process_group_along(tmp_path: Path) -> None:
    pidfile = tmp_path / "left"
    output = await run_command(["sh", "-c", LEAVE_A_CHILD, str(pidfile)], time_limit=30)
    assert output.returncode == 0
    left = int(pidfile.read_text())
    wait_until(lambda: gone(left), 5, "the process the command left behind to be killed")


async def test_a_caller_cancelled_while_a_child_is_stopped_stays_cancelled(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "left"
    child = ManagedProcess(ProcessSpec(("sh", "-c", LEAVE_A_CHILD, str(pidfile))))
    await child.start()
    wait_until(pidfile.exists, 5, "the child to start its own child")
    await asyncio.sleep(0.2)  # the child has exited by itself; its child holds stderr
    stopping = asyncio.create_task(child.stop())
    reader = child._stderr_task
    assert reader is not None
    reader.add_done_callback(lambda _: stopping.cancel())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopping, 30)
    assert stopping.cancelled()
    wait_until(lambda: gone(int(pidfile.read_text())), 5, "the grandchild to be killed")
