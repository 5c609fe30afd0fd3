"""The D-Bus API as consumers see it: contract, errors, validation, authorisation, fuzzing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import contract
from support.callers import call
from support.harness import (
    BUS_NAME,
    ROOT_PATH,
    DaemonFactory,
    PrivateBus,
    busctl,
    gdbus,
)

MANAGER = "org.vfiocaps1.Manager"
ERROR_NAMES = {
    "org.vfiocaps1.Error.NotFound",
    "org.vfiocaps1.Error.InvalidArgument",
    "org.vfiocaps1.Error.NotAuthorized",
    "org.vfiocaps1.Error.ProbeFailed",
    "org.vfiocaps1.Error.Busy",
    "org.vfiocaps1.Error.Timeout",
}


def test_contract_is_documented_everywhere() -> None:
    assert contract.undocumented() == []


def test_exported_manager_equals_the_contract(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    xml = busctl(private_bus.address, "introspect", "--xml-interface", BUS_NAME, ROOT_PATH)
    exported = contract.interfaces(xml.stdout)
    assert exported[MANAGER] == contract.contract()[MANAGER]
    assert "org.freedesktop.DBus.ObjectManager" in exported


@pytest.mark.parametrize(
    ("method", "argument", "error"),
    [
        ("GetCapabilities", "not-an-id", "InvalidArgument"),
        ("GetCapabilities", "", "InvalidArgument"),
        ("GetCapabilities", "x" * 5000, "InvalidArgument"),
        ("GetCapabilities", "/etc/passwd", "InvalidArgument"),
        ("GetCapabilities", "/sys/../etc/passwd", "InvalidArgument"),
        ("GetCapabilities", "/sys/kernel", "InvalidArgument"),
        ("GetCapabilities", "/sys/devices/no/such/device", "InvalidArgument"),
        ("GetCapabilities", "6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01", "NotFound"),
        ("GetCapabilities", "0000:65:00.4", "NotFound"),
        ("GetDevice", "zz:zz.z", "InvalidArgument"),
        ("DomainXml", "6F3B0D1E-93B4-4E5C-9FBC-2D2D7A6C1A01", "NotFound"),
        ("Refresh", "6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01", "NotFound"),
        ("Invalidate", "no spaces allowed", "InvalidArgument"),
        ("Invalidate", "", "InvalidArgument"),
    ],
)
def test_bad_input_gets_a_named_error(
    private_bus: PrivateBus,
    start_daemon: DaemonFactory,
    method: str,
    argument: str,
    error: str,
) -> None:
    daemon = start_daemon()
    result = call(private_bus.address, method, "s", argument)
    assert result.returncode != 0
    name_seen = gdbus(
        private_bus.address,
        "call",
        "--dest",
        BUS_NAME,
        "--object-path",
        ROOT_PATH,
        "--method",
        f"{MANAGER}.{method}",
        argument,
        check=False,
    )
    assert f"org.vfiocaps1.Error.{error}" in name_seen.stderr
    assert daemon.alive()


def test_invalidate_by_root_needs_no_polkit(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    result = call(private_bus.address, "Invalidate", "s", "mtty")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "u 0"


def allow_actions(bus: PrivateBus, *actions: str) -> None:
    gdbus(
        bus.address,
        "call",
        "--dest",
        "org.freedesktop.PolicyKit1",
        "--object-path",
        "/org/freedesktop/PolicyKit1/Authority",
        "--method",
        "org.freedesktop.DBus.Mock.SetAllowed",
        str(list(actions)),
    )


needs_setpriv = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="calls as another user need root and setpriv",
)


@needs_setpriv
def test_unprivileged_invalidate_is_denied_then_allowed_by_polkit(
    shared_bus: PrivateBus,
    polkitd: subprocess.Popen[bytes],
    start_daemon: DaemonFactory,
) -> None:
    daemon = start_daemon(bus=shared_bus)
    denied = call(shared_bus.address, "Invalidate", "s", "mtty", as_user="65534")
    assert denied.returncode != 0
    assert "not authorized to org.vfiocaps.invalidate" in denied.stderr
    type_probe = call(shared_bus.address, "ProbeType", "ss", "mtty", "mtty-1", as_user="65534")
    assert "not authorized to org.vfiocaps.probe-type" in type_probe.stderr
    allow_actions(shared_bus, "org.vfiocaps.invalidate")
    allowed = call(shared_bus.address, "Invalidate", "s", "mtty", as_user="65534")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "u 0"
    reading = call(shared_bus.address, "ListDevices", as_user="65534")
    assert reading.returncode == 0, reading.stderr
    assert daemon.alive()


@needs_setpriv
def test_without_polkit_unprivileged_callers_are_refused(
    shared_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon(bus=shared_bus)
    result = call(shared_bus.address, "Invalidate", "s", "mtty", as_user="65534")
    assert result.returncode != 0
    assert "cannot check authorization" in result.stderr


async def _fuzz_calls(address: str, calls: list[tuple[str, str]]) -> list[Message]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        replies = []
        for member, argument in calls:
            reply = await bus.call(
                Message(
                    destination=BUS_NAME,
                    path=ROOT_PATH,
                    interface=MANAGER,
                    member=member,
                    signature="s",
                    body=[argument],
                )
            )
            assert reply is not None
            replies.append(reply)
        return replies
    finally:
        bus.disconnect()


_ids = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300),
    st.uuids().map(str),
    st.from_regex(r"\A[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-9]\Z"),
    st.lists(st.sampled_from(["..", "sys", "devices", "bus", "mdev", "etc", ".", ""])).map(
        lambda parts: "/" + "/".join(parts)
    ),
)


@pytest.mark.slow
def test_fuzzing_every_string_method_gives_named_errors_only(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    daemon = start_daemon()
    members = ["GetDevice", "GetCapabilities", "Refresh", "DomainXml", "Invalidate"]
    seen: dict[str, int] = {}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(members), _ids), min_size=1, max_size=10))
    def run(calls: list[tuple[str, str]]) -> None:
        for reply in asyncio.run(_fuzz_calls(private_bus.address, calls)):
            if reply.message_type is MessageType.ERROR:
                assert reply.error_name in ERROR_NAMES, (reply.error_name, reply.body)
                seen[reply.error_name] = seen.get(reply.error_name, 0) + 1

    run()
    assert daemon.alive()
    assert "Traceback" not in daemon.log()
    assert {"org.vfiocaps1.Error.InvalidArgument", "org.vfiocaps1.Error.NotFound"} <= set(seen)
