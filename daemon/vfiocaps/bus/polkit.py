"""Asking polkit whether a bus caller may perform an action (root may, without asking).

Every check is bounded: it waits at most :data:`CHECK_SECONDS`, or
``Config.authorization_timeout`` when the caller allowed an interactive authentication, and is
withdrawn from polkit (``CancelCheckAuthorization`` with its own cancellation id) when that time
passes or when the caller leaves the bus, so that a caller whose agent never answers holds
nothing for long.

Root is answered first, before any cap: it needs no polkit. Every other call is counted against
its connection's cap (``per_sender``), then its user's (``per_user``, over all of the user's
connections), and only then against the cap of all (``total``), so that users who fill their own
caps use up no more than that. Beyond a cap, the call is answered ``Busy`` at once and other
users are still checked. ``headroom`` checks past ``total`` are kept for administrators: a uid
polkit has authorised before (in this run) may use all of it, and a user's first check while
none of theirs waits (an administrator who comes to act while others flood) half of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from ..errors import BusyError, NotAuthorizedError

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
BUS_DAEMON = "org.freedesktop.DBus"
ALLOW_USER_INTERACTION = 0x1
CHECK_SECONDS = 25.0  # a check polkit answers by itself
INTERACTIVE_CHECK_SECONDS = 120.0  # a person typing a password into their agent
CANCEL_SECONDS = 5.0
MAX_CHECKS_PER_SENDER = 4
MAX_CHECKS_PER_USER = 8  # over all of a user's connections
MAX_CHECKS = 64
HEADROOM = 16  # checks past MAX_CHECKS, for administrators
UID_SECONDS = 5.0  # the bus daemon naming a caller's uid
MAX_LOOKUPS_PER_SENDER = 16  # uid questions of one connection under way at once
# Users polkit authorised, remembered for the headroom (the most recent ones).
REMEMBERED_ADMINS = 64


def _bus_daemon_call(
    member: str, signature: str, *body: object, flags: MessageFlag = MessageFlag.NONE
) -> Message:
    return Message(
        destination=BUS_DAEMON,
        path="/org/freedesktop/DBus",
        interface=BUS_DAEMON,
        member=member,
        signature=signature,
        body=list(body),
        flags=flags,
    )


def _departure_rule(sender: str) -> str:
    return (
        f"type='signal',sender='{BUS_DAEMON}',interface='{BUS_DAEMON}',"
        f"member='NameOwnerChanged',arg0='{sender}'"
    )


class Authority:
    """Checks actions for callers identified by their unique bus names."""

    def __init__(
        self,
        bus: MessageBus,
        *,
        timeout: float = INTERACTIVE_CHECK_SECONDS,
        per_sender: int = MAX_CHECKS_PER_SENDER,
        per_user: int = MAX_CHECKS_PER_USER,
        total: int = MAX_CHECKS,
        headroom: int = HEADROOM,
    ) -> None:
        """*timeout*: the longest wait for one answer (an interactive check's; a check
        polkit answers by itself waits at most :data:`CHECK_SECONDS` of it)."""
        self._bus = bus
        self._timeout = min(CHECK_SECONDS, timeout)
        self._interactive_timeout = timeout
        self._per_sender = per_sender
        self._per_user = per_user
        self._total = total
        self._headroom = headroom
        self._admins: dict[int, None] = {}  # uids polkit authorised, oldest first
        self._lookups: dict[str, int] = {}  # sender -> uid questions under way
        self._waiting: dict[str, int] = {}  # sender -> checks under way
        self._by_user: dict[int, int] = {}  # uid -> checks waiting for polkit
        self._departed: dict[str, asyncio.Event] = {}
        self._ids = itertools.count(1)
        self._cancels: set[asyncio.Task[None]] = set()

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
        try:
            async with asyncio.timeout(UID_SECONDS):
                reply = await self._call(_bus_daemon_call("GetConnectionUnixUser", "s", sender))
        except TimeoutError as err:
            raise NotAuthorizedError(
                f"the bus did not name the caller's user within {UID_SECONDS:g} s; try again"
            ) from err
        return int(reply.body[0])

    @property
    def waiting(self) -> int:
        """Checks waiting for polkit now."""
        return sum(self._waiting.values())

    async def check(self, sender: str, action: str, interactive: bool) -> None:
        """Return if *sender* may perform *action*; root always may, before any cap.

        Raises:
            NotAuthorizedError: polkit said no, needs a challenge the caller cannot answer,
                did not answer in time, or could not be asked; or the caller left.
            BusyError: too many checks of this connection, of this user, or in all, are waiting
                already.
        """
        looking = self._lookups.get(sender, 0)
        if looking >= MAX_LOOKUPS_PER_SENDER:
            raise BusyError("too many calls of this caller are being checked; try again")
        self._lookups[sender] = looking + 1
        try:
            uid = await self.caller_uid(sender)
        finally:
            self._lookups[sender] -= 1
            if not self._lookups[sender]:
                del self._lookups[sender]
        if uid == 0:
            return
        self._admit(sender, uid)
        self._by_user[uid] = self._by_user.get(uid, 0) + 1
        try:
            await self._watch(sender)
            try:
                await self._ask_polkit(sender, action, interactive)
            finally:
                self._unwatch(sender)
        finally:
            self._by_user[uid] -= 1
            if not self._by_user[uid]:
                del self._by_user[uid]
        self._admins.pop(uid, None)
        self._admins[uid] = None
        while len(self._admins) > REMEMBERED_ADMINS:
            del self._admins[next(iter(self._admins))]

    def _admit(self, sender: str, uid: int) -> None:
        """Check the caps, the caller's own first (see the module's description).

        Raises:
            BusyError: a cap is reached.
        """
        if self._waiting.get(sender, 0) >= self._per_sender:
            raise BusyError(
                f"{self._per_sender} authorization checks of this caller are waiting already; "
                f"answer them (or cancel them) and try again"
            )
        if self._by_user.get(uid, 0) >= self._per_user:
            raise BusyError(
                f"{self._per_user} authorization checks of uid {uid} are waiting already; "
                f"answer them (or cancel them) and try again"
            )
        limit = self._total
        if uid in self._admins:
            limit += self._headroom
        elif uid not in self._by_user:
            limit += self._headroom // 2  # the other half stays for known administrators
        if self.waiting >= limit:
            raise BusyError("too many authorization checks are waiting; try again later")

    async def _ask_polkit(self, sender: str, action: str, interactive: bool) -> None:
        cancellation_id = f"vfiocaps-{os.getpid()}-{next(self._ids)}"
        subject = ("system-bus-name", {"name": Variant("s", sender)})
        flags = ALLOW_USER_INTERACTION if interactive else 0
        message = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_INTERFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, action, {}, flags, cancellation_id],
        )
        asking = asyncio.ensure_future(self._call(message))
        departed = asyncio.ensure_future(self._departed[sender].wait())
        limit = self._interactive_timeout if interactive else self._timeout
        try:
            done, _ = await asyncio.wait(
                {asking, departed}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            departed.cancel()
            if not asking.done():
                asking.cancel()
                self._cancel_later(cancellation_id)
        if asking not in done:
            why = "the caller left" if departed in done else f"no answer within {limit:g} s"
            log.info("authorization check of %s for %s withdrawn: %s", action, sender, why)
            raise NotAuthorizedError(f"not authorized to {action}: {why}")
        (is_authorized, is_challenge, _details) = asking.result().body[0]
        if is_authorized:
            return
        log.info("polkit denied %s to %s%s", action, sender, " (challenge)" if is_challenge else "")
        raise NotAuthorizedError(f"not authorized to {action}")

    def _cancel_later(self, cancellation_id: str) -> None:
        """Withdraw a check from polkit, without making anyone wait for that."""
        task = asyncio.create_task(self._cancel(cancellation_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, cancellation_id: str) -> None:
        message = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_INTERFACE,
            member="CancelCheckAuthorization",
            signature="s",
            body=[cancellation_id],
        )
        try:
            async with asyncio.timeout(CANCEL_SECONDS):
                reply = await self._bus.call(message)
        except TimeoutError:
            log.warning("polkit did not answer the cancellation of check %s", cancellation_id)
            return
        except Exception as err:  # noqa: BLE001 - a failed withdrawal is only worth a line
            log.warning("cannot cancel authorization check %s: %s", cancellation_id, err)
            return
        if reply is not None and reply.message_type is MessageType.ERROR:
            log.debug("polkit on cancelling %s: %s", cancellation_id, reply.error_name)

    # ---- callers leaving --------------------------------------------------------------------

    async def _watch(self, sender: str) -> None:
        """Count a check of *sender* and follow its departure from the bus."""
        count = self._waiting.get(sender, 0)
        self._waiting[sender] = count + 1
        if count:
            return
        if not self._departed:
            self._bus.add_message_handler(self._on_message)
        self._departed[sender] = asyncio.Event()
        try:
            await self._call(_bus_daemon_call("AddMatch", "s", _departure_rule(sender)))
        except BaseException:
            self._unwatch(sender)
            raise

    def _unwatch(self, sender: str) -> None:
        count = self._waiting.get(sender, 0) - 1
        if count > 0:
            self._waiting[sender] = count
            return
        self._waiting.pop(sender, None)
        self._departed.pop(sender, None)
        if not self._departed:
            self._bus.remove_message_handler(self._on_message)
        if self._bus.connected:
            rule = _departure_rule(sender)
            flags = MessageFlag.NO_REPLY_EXPECTED
            self._bus.send(_bus_daemon_call("RemoveMatch", "s", rule, flags=flags))

    def _on_message(self, message: Message) -> None:
        """A bus message handler: a watched caller left. Returns None so dispatch continues."""
        if (
            message.message_type is MessageType.SIGNAL
            and message.sender == BUS_DAEMON
            and message.member == "NameOwnerChanged"
            and message.signature == "sss"
            and message.body[2] == ""
        ):
            departed = self._departed.get(message.body[0])
            if departed is not None:
                departed.set()
