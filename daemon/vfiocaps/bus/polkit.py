"""Asking polkit whether a bus caller may perform an action (root may, without asking)."""

from __future__ import annotations

import logging

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ..errors import NotAuthorizedError

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 0x1


class Authority:
    """Checks actions for callers identified by their unique bus names."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    async def _call(self, message: Message) -> Message:
        reply = await self._bus.call(message)
        if reply is None:
            raise NotAuthorizedError(f"no reply from {message.destination}")
        if reply.message_type is MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise NotAuthorizedError(
                f"cannot check authorization: {reply.error_name}: {detail}".rstrip(": ")
            )
        return reply

    async def caller_uid(self, sender: str) -> int:
        """The Unix user id of the connection *sender*.

        Raises:
            NotAuthorizedError: the bus cannot tell.
        """
        reply = await self._call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionUnixUser",
                signature="s",
                body=[sender],
            )
        )
        return int(reply.body[0])

    async def check(self, sender: str, action: str, interactive: bool) -> None:
        """Return if *sender* may perform *action*; root always may.

        Raises:
            NotAuthorizedError: polkit said no, needs a challenge the caller cannot answer, or
                could not be asked.
        """
        if await self.caller_uid(sender) == 0:
            return
        subject = ("system-bus-name", {"name": Variant("s", sender)})
        message = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_INTERFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, action, {}, ALLOW_USER_INTERACTION if interactive else 0, ""],
        )
        reply = await self._call(message)
        (is_authorized, is_challenge, _details) = reply.body[0]
        if is_authorized:
            return
        log.info("polkit denied %s to %s%s", action, sender, " (challenge)" if is_challenge else "")
        raise NotAuthorizedError(f"not authorized to {action}")
