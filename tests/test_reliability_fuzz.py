"""Bad input through the real daemon: every object, interface, method and property fuzzed with
right and wrong signatures (hypothesis); only named errors come back and the daemon still answers
correctly afterwards."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.daemon_lab import Lab, capabilities
from support.harness import BUS_NAME, ROOT_PATH
from support.reliability import device_path

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed"
)

MANAGER = "org.vfiocaps1.Manager"
DEVICE = "org.vfiocaps1.Device"
PROPERTIES = "org.freedesktop.DBus.Properties"

# vfiocaps' own errors and the D-Bus errors for calls that do not fit the interfaces. Not
# org.freedesktop.DBus.Error.Failed: that is what an unexpected exception becomes.
ALLOWED_ERRORS = {
    "org.vfiocaps1.Error.NotFound",
    "org.vfiocaps1.Error.InvalidArgument",
    "org.vfiocaps1.Error.NotAuthorized",
    "org.vfiocaps1.Error.ProbeFailed",
    "org.vfiocaps1.Error.Busy",
    "org.vfiocaps1.Error.Timeout",
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.InvalidArgs",
    "org.freedesktop.DBus.Error.InvalidSignature",
    "org.freedesktop.DBus.Error.PropertyReadOnly",
    "org.freedesktop.DBus.Error.NotSupported",  # dbus-fast: Get/Set with an empty interface
}

MEMBERS = {
    MANAGER: {"ListDevices": "", "GetDevice": "s", "GetCapabilities": "s", "ListTypes": "",
              "Refresh": "s", "Invalidate": "s", "DomainXml": "s", "ProbeType": "ss",
              "DomainXmlParts": "ss",
              "MigrationFingerprint": "s", "CheckMigration": "ss"},
    DEVICE: {"Refresh": ""},
    PROPERTIES: {"Get": "ss", "GetAll": "s", "Set": "ssv"},
    "org.freedesktop.DBus.ObjectManager": {"GetManagedObjects": ""},
    "org.freedesktop.DBus.Introspectable": {"Introspect": ""},
    "org.freedesktop.DBus.Peer": {"Ping": "", "GetMachineId": ""},
}  # fmt: skip
PROPERTY_NAMES = ["Version", "DeviceCount", "CacheState", "Id", "ProbeState", "Display",
                  "MigrationBlockers", "ProbedAt", "LastError", "Nope", ""]  # fmt: skip

_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=80
)
# (signature, body) pairs: right shapes with odd values, and wrong shapes.
_arguments: st.SearchStrategy[tuple[str, list[Any]]] = st.one_of(
    st.just(("", [])),
    _text.map(lambda s: ("s", [s])),
    st.tuples(_text, _text).map(lambda t: ("ss", list(t))),
    st.tuples(st.sampled_from([MANAGER, DEVICE, "", "x.y"]), st.sampled_from(PROPERTY_NAMES)).map(
        lambda t: ("ss", list(t))
    ),
    st.tuples(
        st.sampled_from([MANAGER, DEVICE, "org.example"]),
        st.sampled_from(PROPERTY_NAMES),
        st.one_of(
            _text.map(lambda s: Variant("s", s)),
            st.integers(0, 2**32 - 1).map(lambda i: Variant("u", i)),
            st.booleans().map(lambda b: Variant("b", b)),
            st.lists(_text, max_size=3).map(lambda v: Variant("as", v)),
        ),
    ).map(lambda t: ("ssv", list(t))),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: ("i", [i])),
    st.lists(_text, max_size=4).map(lambda v: ("as", [v])),
    st.tuples(st.booleans(), st.floats(allow_nan=True)).map(lambda t: ("bd", list(t))),
    st.dictionaries(_text, _text.map(lambda s: Variant("s", s)), max_size=3).map(
        lambda d: ("a{sv}", [d])
    ),
)


async def _send(address: str, calls: list[tuple[str, str, str, str, list[Any]]]) -> list[Message]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        replies = []
        for path, interface, member, signature, body in calls:
            reply = await asyncio.wait_for(
                bus.call(
                    Message(
                        destination=BUS_NAME,
                        path=path,
                        interface=interface,
                        member=member,
                        signature=signature,
                        body=body,
                    )
                ),
                60,
            )
            assert reply is not None
            replies.append(reply)
        return replies
    finally:
        bus.disconnect()


@pytest.mark.slow
def test_fuzzing_every_object_method_and_property(lab: Lab) -> None:
    lab.host.build("samples")
    daemon = lab.start()
    mtty = lab.host.add_instance("mtty", "mtty-1")
    mdpy = lab.host.add_instance("mdpy", "mdpy-hd")
    lab.wait_states({mtty: "done", mdpy: "done"})
    paths = [ROOT_PATH, device_path(lab.bus.address, mtty), device_path(lab.bus.address, mdpy),
             "/org/vfiocaps/devices/none", "/org/vfiocaps/devices", "/", "/org"]  # fmt: skip
    ids = st.one_of(
        st.sampled_from(
            [mtty, mdpy, mtty.upper(), f"/sys/bus/mdev/devices/{mdpy}", "mtty", "mdpy", "mtty-1",
             MANAGER, DEVICE, "", "/sys/../etc/passwd", "/sys/bus/mdev/devices/../../../etc"]
        ),
        _text,
    )  # fmt: skip
    names = st.one_of(st.sampled_from([*PROPERTY_NAMES, "mtty-1", "mdpy-hd", "../x"]), _text)
    values = st.one_of(
        _text.map(lambda v: Variant("s", v)),
        st.integers(0, 2**32 - 1).map(lambda v: Variant("u", v)),
        st.lists(_text, max_size=3).map(lambda v: Variant("as", v)),
    )
    bodies: dict[str, st.SearchStrategy[list[Any]]] = {
        "": st.just([]),
        "s": ids.map(lambda v: [v]),
        "ss": st.tuples(ids, names).map(list),
        "ssv": st.tuples(st.sampled_from([MANAGER, DEVICE, "x"]), names, values).map(list),
    }
    homes = {MANAGER: [ROOT_PATH], DEVICE: paths[1:4]}
    well_formed = st.sampled_from(
        [(i, m, sig) for i, members in MEMBERS.items() for m, sig in members.items()]
    ).flatmap(
        lambda k: st.tuples(st.sampled_from(homes.get(k[0], paths)), bodies[k[2]]).map(
            lambda pb: (pb[0], k[0], k[1], k[2], pb[1])
        )
    )
    ill_formed = st.tuples(
        st.sampled_from(paths),
        st.sampled_from([*MEMBERS, "org.example.Nope"]),
        st.sampled_from(sorted({m for ms in MEMBERS.values() for m in ms} | {"Nope"})),
        _arguments,
    ).map(lambda c: (c[0], c[1], c[2], c[3][0], c[3][1]))
    call = st.one_of(well_formed, well_formed, well_formed, ill_formed)
    tally = {"calls": 0, "errors": 0, "replies": 0}
    errors: dict[str, int] = {}

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(call, min_size=1, max_size=8))
    def run(calls: list[tuple[str, str, str, str, list[Any]]]) -> None:
        for reply in asyncio.run(_send(lab.bus.address, calls)):
            tally["calls"] += 1
            if reply.message_type is MessageType.ERROR:
                tally["errors"] += 1
                errors[str(reply.error_name)] = errors.get(str(reply.error_name), 0) + 1
                assert reply.error_name in ALLOWED_ERRORS, (reply.error_name, reply.body)
            else:
                tally["replies"] += 1

    run()
    assert daemon.alive()
    assert "Traceback" not in daemon.log()
    assert capabilities(lab.bus, mtty)["MigrationWithOptions"] == "supported"
    assert capabilities(lab.bus, mdpy)["Display"] == "region"
    print(f"fuzz: {tally}; errors by name: {errors}")
