"""Calls that wait for a probe are bounded per sender: beyond the bound a caller hears Busy."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from support.daemon_lab import Lab, capabilities
from support.harness import BUS_NAME, ROOT_PATH

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

MANAGER = "org.vfiocaps1.Manager"
SLOW = "0f0f0f0f-0000-4000-8000-00000000c0de"
PER_SENDER = 32


async def _flood(address: str, member: str, calls: int) -> tuple[list[str], int]:
    """Send *calls* calls at once from one connection; return the errors that came back within
    two seconds, and how many calls were still waiting then."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        pending = {
            asyncio.ensure_future(
                bus.call(
                    Message(
                        destination=BUS_NAME,
                        path=ROOT_PATH,
                        interface=MANAGER,
                        member=member,
                        signature="s",
                        body=[SLOW],
                    )
                )
            )
            for _ in range(calls)
        }
        done, waiting = await asyncio.wait(pending, timeout=2)
        errors = []
        for reply in (task.result() for task in done):
            assert reply is not None
            assert reply.message_type is MessageType.ERROR, reply.body
            errors.append(reply.error_name or "")
        for task in waiting:
            task.cancel()
        return errors, len(waiting)
    finally:
        bus.disconnect()


@pytest.mark.parametrize("member", ["GetCapabilities", "DomainXml"])
def test_one_sender_waits_for_a_probe_with_a_bounded_number_of_calls(lab: Lab, member: str) -> None:
    lab.host.build("mtty")
    lab.overrides({"devices": {SLOW: {"fault": {"on": "query-migrate", "pause_seconds": 3}}}})
    daemon = lab.start()
    lab.host.add_instance("mtty", "mtty-1", uuid=SLOW)
    lab.wait_states({SLOW: "probing"}, timeout=20)
    errors, waiting = asyncio.run(_flood(lab.bus.address, member, PER_SENDER + 8))
    assert errors == ["org.vfiocaps1.Error.Busy"] * 8
    assert waiting == PER_SENDER
    # Another sender is not held back by the first one's calls.
    others, still = asyncio.run(_flood(lab.bus.address, member, 1))
    assert (others, still) == ([], 1)
    lab.wait_states({SLOW: "done"}, timeout=60)
    assert capabilities(lab.bus, SLOW)["MigrationWithOptions"] == "supported"
    assert daemon.alive()
