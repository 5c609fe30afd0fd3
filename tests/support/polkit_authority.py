"""A polkit authority for tests: org.freedesktop.PolicyKit1.Authority on a private bus, whose
CheckAuthorization says yes at once to subjects of one uid and never answers anyone else (as when
a user's authentication agent never replies), until CancelCheckAuthorization withdraws the check.

Run as ``python polkit_authority.py serve BUS_ADDRESS ADMIN_UID EVENT_LOG``; each event is
appended to EVENT_LOG as a JSON line: ``{"event": "check"|"cancel", "id": cancellation id, ...}``,
and an authentication agent that registers (pkttyagent) as ``{"event": "agent", "pid": ...}``.

``python polkit_authority.py flood BUS_ADDRESS COUNT`` is the impatient caller: it sends COUNT
interactive ``Invalidate`` calls to vfiocapsd at once, prints the error names of the replies that
came within two seconds (JSON), and stays connected, its other calls waiting, until stdin closes.
"""

# dbus-fast reads the annotations at class creation: keep them real objects, not strings.
import asyncio
import json
import sys
from typing import Annotated, Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_method

Subject = Annotated[tuple[str, dict[str, Variant]], DBusSignature("(sa{sv})")]
Details = Annotated[dict[str, str], DBusSignature("a{ss}")]
Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
Result = Annotated[tuple[bool, bool, dict[str, str]], DBusSignature("(bba{ss})")]

NAME = "org.freedesktop.PolicyKit1"
PATH = "/org/freedesktop/PolicyKit1/Authority"


def subject_pid(subject: Any) -> int:
    """The pid of a unix-process subject (0 for another kind)."""
    pid = subject[1].get("pid")
    return int(pid.value) if pid is not None else 0


class Authority(ServiceInterface):
    def __init__(self, bus: MessageBus, admin_uid: int, log_path: str) -> None:
        super().__init__("org.freedesktop.PolicyKit1.Authority")
        self.bus = bus
        self.admin_uid = admin_uid
        self.log_path = log_path
        self.pending: dict[str, asyncio.Future[None]] = {}

    def log(self, **event: Any) -> None:
        with open(self.log_path, "a") as out:
            out.write(json.dumps(event) + "\n")

    async def subject_uid(self, subject: Any) -> int:
        name = subject[1]["name"].value
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionUnixUser",
                signature="s",
                body=[name],
            )
        )
        assert reply is not None
        return int(reply.body[0])

    @dbus_method()
    async def CheckAuthorization(
        self,
        subject: Subject,
        action_id: DBusStr,
        details: Details,
        flags: DBusUInt32,
        cancellation_id: DBusStr,
    ) -> Result:
        uid = await self.subject_uid(subject)
        self.log(event="check", id=cancellation_id, uid=uid, action=action_id, flags=flags)
        if uid == self.admin_uid:
            return (True, False, {})
        withdrawn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[cancellation_id] = withdrawn
        await withdrawn
        raise DBusError("org.freedesktop.PolicyKit1.Error.Cancelled", "cancelled")

    @dbus_method()
    def RegisterAuthenticationAgent(
        self, subject: Subject, locale: DBusStr, object_path: DBusStr
    ) -> None:
        self.log(event="agent", pid=subject_pid(subject), path=object_path)

    @dbus_method()
    def RegisterAuthenticationAgentWithOptions(
        self, subject: Subject, locale: DBusStr, object_path: DBusStr, options: Options
    ) -> None:
        self.log(event="agent", pid=subject_pid(subject), path=object_path)

    @dbus_method()
    def UnregisterAuthenticationAgent(self, subject: Subject, object_path: DBusStr) -> None:
        self.log(event="agent-gone", pid=subject_pid(subject), path=object_path)

    @dbus_method()
    def CancelCheckAuthorization(self, cancellation_id: DBusStr) -> None:
        self.log(event="cancel", id=cancellation_id)
        withdrawn = self.pending.pop(cancellation_id, None)
        if withdrawn is None:
            raise DBusError("org.freedesktop.PolicyKit1.Error.Failed", "no such check")
        withdrawn.set_result(None)


async def serve(address: str, admin_uid: int, log_path: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    bus.export(PATH, Authority(bus, admin_uid, log_path))
    await bus.request_name(NAME)
    print("ready", flush=True)
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


async def flood(address: str, count: int) -> None:
    bus = await MessageBus(bus_address=address).connect()
    calls = [
        asyncio.ensure_future(
            bus.call(
                Message(
                    destination="org.vfiocaps",
                    path="/org/vfiocaps",
                    interface="org.vfiocaps1.Manager",
                    member="Invalidate",
                    signature="s",
                    body=["mtty"],
                    flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION,
                )
            )
        )
        for _ in range(count)
    ]
    done, pending = await asyncio.wait(calls, timeout=2)
    replies: dict[str, int] = {"waiting": len(pending)}
    for call in done:
        reply = call.result()
        name = str(reply.error_name) if reply.message_type is MessageType.ERROR else "return"
        replies[name] = replies.get(name, 0) + 1
    print(json.dumps(replies), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    else:
        asyncio.run(flood(sys.argv[2], int(sys.argv[3])))
