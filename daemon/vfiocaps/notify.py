"""Service manager notifications (sd_notify protocol): readiness, status, watchdog, stopping.

The protocol is one datagram per notification, ``KEY=VALUE`` lines separated by newlines, sent
to the ``AF_UNIX`` datagram socket named by ``$NOTIFY_SOCKET``: a file system path, or an
abstract socket written with a leading ``@``. The service manager reads the sender's
credentials from the socket, so notifications must come from the main process when the unit
says ``NotifyAccess=main``. Nothing here needs libsystemd.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .engine import DeviceView, EngineStatus
from .errors import ConfigError

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 5.0
# The service manager reads notification datagrams into a buffer of this size (NOTIFY_BUFFER_MAX).
MAX_MESSAGE_BYTES = 4096


class NotifyError(ConfigError):
    """``$NOTIFY_SOCKET`` is malformed, or the service manager cannot be reached through it."""


class ServiceState(enum.Enum):
    """Life-cycle notifications the daemon sends, as ``KEY=VALUE`` lines."""

    READY = "READY=1"
    STOPPING = "STOPPING=1"
    WATCHDOG = "WATCHDOG=1"


@dataclass(frozen=True)
class NotifyAddress:
    """Where notifications go: a socket path, or an abstract name (stored without the NUL)."""

    name: str
    abstract: bool

    @classmethod
    def parse(cls, value: str) -> NotifyAddress:
        """Parse a ``$NOTIFY_SOCKET`` value.

        Raises:
            NotifyError: the value is neither an absolute path nor ``@`` and a name.
        """
        if "\0" in value:
            raise NotifyError("$NOTIFY_SOCKET contains a NUL character")
        if value.startswith("@") and len(value) > 1:
            return cls(value[1:], abstract=True)
        if value.startswith("/"):
            return cls(value, abstract=False)
        raise NotifyError(
            f"$NOTIFY_SOCKET must be an absolute path or @name, got {value!r}"
            " (vsock addresses are not supported)"
        )

    @property
    def sockaddr(self) -> str | bytes:
        """The address for :meth:`socket.socket.connect`: the path, or NUL and the name."""
        if self.abstract:
            return b"\0" + os.fsencode(self.name)
        return self.name

    def describe(self) -> str:
        """The address as ``$NOTIFY_SOCKET`` spells it."""
        return f"@{self.name}" if self.abstract else self.name


def watchdog_interval(watchdog_usec: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings: half the manager's timeout, or None when off.

    Raises nothing.
    """
    if watchdog_usec <= 0:
        return None
    return watchdog_usec / 2 / 1_000_000


def status_line(text: str) -> str:
    """A ``STATUS=`` line for *text*, on one line (newlines would end the field).

    Raises nothing.
    """
    return "STATUS=" + " ".join(text.split())


class Notifier:
    """Sends notifications to the service manager over a non-blocking datagram socket.

    One notification is one datagram; :meth:`send` never blocks the event loop.
    """

    def __init__(self, address: NotifyAddress, send_timeout: float = SEND_TIMEOUT_SECONDS) -> None:
        self.address = address
        self.send_timeout = send_timeout
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or None when the daemon has no service manager.

        Raises:
            NotifyError: ``$NOTIFY_SOCKET`` is set but malformed.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return None
        return cls(NotifyAddress.parse(value))

    async def _connected_socket(self) -> socket.socket:
        """The datagram socket, connected to the manager's: a connected socket is writable only
        when the manager's queue has room, so a busy manager makes us wait instead of spin."""
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, self.address.sockaddr)
            except BaseException:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    async def send(self, *lines: str) -> None:
        """Send *lines* (``KEY=VALUE`` each) as one notification.

        Raises:
            NotifyError: a line is malformed, the message is empty or too long, the socket
                does not exist or refuses, or the manager did not take the message within
                :attr:`send_timeout` seconds.
        """
        for line in lines:
            key, sep, _ = line.partition("=")
            if not sep or not key or "\n" in line:
                raise NotifyError(f"not a KEY=VALUE notification line: {line!r}")
        data = "\n".join(lines).encode()
        if not data:
            raise NotifyError("an empty notification")
        if len(data) > MAX_MESSAGE_BYTES:
            raise NotifyError(f"a notification of {len(data)} bytes is too long")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.send_timeout):
                await loop.sock_sendall(await self._connected_socket(), data)
        except TimeoutError as err:
            self.close()
            raise NotifyError(
                f"the service manager did not read {self.address.describe()}"
                f" in {self.send_timeout}s"
            ) from err
        except OSError as err:
            self.close()
            raise NotifyError(
                f"cannot notify the service manager at {self.address.describe()}: {err.strerror}"
            ) from err

    async def ready(self, status: str | None = None) -> None:
        """``READY=1``, with a status line when *status* is given.

        Raises:
            NotifyError: as :meth:`send`.
        """
        lines = [ServiceState.READY.value]
        if status is not None:
            lines.append(status_line(status))
        await self.send(*lines)

    async def status(self, text: str) -> None:
        """``STATUS=`` *text*: what ``systemctl status`` shows.

        Raises:
            NotifyError: as :meth:`send`.
        """
        await self.send(status_line(text))

    async def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``, with a status line when *status* is given.

        Raises:
            NotifyError: as :meth:`send`.
        """
        lines = [ServiceState.STOPPING.value]
        if status is not None:
            lines.append(status_line(status))
        await self.send(*lines)

    async def watchdog(self) -> None:
        """One ``WATCHDOG=1`` ping.

        Raises:
            NotifyError: as :meth:`send`.
        """
        await self.send(ServiceState.WATCHDOG.value)

    async def keep_watchdog(self, interval: float) -> None:
        """Ping the watchdog every *interval* seconds until cancelled.

        The pings come from the event loop, so a loop that stops turning stops them and the
        service manager restarts the daemon.

        Raises:
            NotifyError: a ping could not be sent.
            asyncio.CancelledError: when cancelled (the normal way to end it).
        """
        if interval <= 0:
            raise NotifyError(f"a watchdog interval must be positive, got {interval}")
        while True:
            await self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Close the socket; a later send connects a new one. Raises nothing."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class ServiceStatus:
    """The service manager's output: ``READY=1`` with *ready* when serving begins, watchdog
    pings every *watchdog* seconds (None: none), how the daemon is doing (``STATUS=``) at most
    once a second, and ``STOPPING=1`` at the end."""

    def __init__(self, notifier: Notifier, ready: str, watchdog: float | None = None) -> None:
        self._notifier = notifier
        self._ready = ready
        self._watchdog = watchdog
        self._latest: EngineStatus | None = None
        self._task: asyncio.Task[None] | None = None
        self._pings: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Serving began: say so, then keep the watchdog fed."""
        if self._pings is None:
            self._pings = asyncio.get_running_loop().create_task(self._ready_then_ping())

    async def _ready_then_ping(self) -> None:
        try:
            await self._notifier.ready(self._ready)
        except NotifyError as err:
            log.warning("%s", err)
        if self._watchdog is None:
            return
        try:
            await self._notifier.keep_watchdog(self._watchdog)
        except NotifyError as err:
            log.error("watchdog pings stopped: %s", err)

    @staticmethod
    def describe(status: EngineStatus) -> str:
        """One line for ``systemctl status``."""
        probing = ", probing" if status.probing else ""
        cache = status.cache_state.value + (f": {status.cache_error}" if status.cache_error else "")
        return (
            f"{status.device_count} devices, {status.probes_launched} probes since start"
            f"{probing}; cache {cache}"
        )

    def status_changed(self, status: EngineStatus) -> None:
        self._latest = status
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send_soon())

    async def _send_soon(self) -> None:
        await asyncio.sleep(1.0)
        if self._latest is not None:
            try:
                await self._notifier.status(self.describe(self._latest))
            except NotifyError as err:
                log.warning("%s", err)

    def device_added(self, view: DeviceView) -> None:
        pass

    def device_changed(self, view: DeviceView) -> None:
        pass

    def device_removed(self, device_id: str) -> None:
        pass

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None:
        pass

    async def close(self) -> None:
        """Say that the daemon stops; end the pings and a pending status update. Raises
        nothing."""
        for task in (self._pings, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            await self._notifier.stopping("stopping")
        except NotifyError as err:
            log.warning("%s", err)
        self._notifier.close()
