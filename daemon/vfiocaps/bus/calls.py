"""Per-call context for D-Bus methods: who is calling, and errors mapped through one table."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from dbus_fast import Message, MessageFlag, MessageType

from ..errors import BusyError
from .errors import to_dbus_error

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Caller:
    """The connection a method call came from."""

    sender: str
    interactive: bool


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "vfiocaps_caller", default=None
)


def note_caller(message: Message) -> None:
    """A bus message handler: remember the sender of each incoming method call.

    dbus-fast dispatches a call (and creates the task of an ``async`` method) right after the
    message handlers run, in the same context, so the method sees this value. Returns None so
    that dispatch continues.
    """
    if message.message_type is MessageType.METHOD_CALL:
        interactive = bool(message.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        _CALLER.set(Caller(message.sender or "", interactive))


def current_caller() -> Caller:
    """The caller of the method being served.

    Raises:
        LookupError: called outside a D-Bus method call.
    """
    caller = _CALLER.get()
    if caller is None:
        raise LookupError("not inside a D-Bus method call")
    return caller


Method = Callable[P, Coroutine[Any, Any, R]]


def mapped_errors(member: str) -> Callable[[Method[P, R]], Method[P, R]]:
    """Decorate an ``async`` D-Bus method so every exception becomes a named D-Bus error."""

    def decorate(fn: Method[P, R]) -> Method[P, R]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise to_dbus_error(err, member) from err

        return wrapper

    return decorate


class WaitsPerSender:
    """Bounds how many calls each sender may have waiting (for a probe) at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, sender: str) -> Iterator[None]:
        """One waiting call of *sender* for the life of the block.

        Raises:
            BusyError: *sender* has *limit* calls waiting already.
        """
        count = self._waiting.get(sender, 0)
        if count >= self.limit:
            raise BusyError(
                f"{sender} has {count} calls waiting for probes; call again when one returned"
            )
        self._waiting[sender] = count + 1
        try:
            yield
        finally:
            if self._waiting[sender] == 1:
                del self._waiting[sender]
            else:
                self._waiting[sender] -= 1
