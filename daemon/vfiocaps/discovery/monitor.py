"""The udev monitor: a netlink socket read from the asyncio loop, turned into plain uevents."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hostpaths import UDEV_CONTROL
from .errors import UdevUnavailableError

log = logging.getLogger("vfiocaps.discovery")

# udevd itself asks for 128 MiB; the kernel caps it at net.core.rmem_max unless we may force it.
RECEIVE_BUFFER_BYTES = 128 * 1024 * 1024
# udevd's control socket; libudev ignores udev events when it is missing and /dev is no devtmpfs.
# At most this many uevents are read in one go, so that a storm cannot starve the loop.
DRAIN_LIMIT = 4096


@dataclass(frozen=True)
class Uevent:
    """The properties of one uevent that discovery uses."""

    action: str
    devpath: str
    subsystem: str
    driver: str = ""
    mdev_state: str = ""
    seqnum: int = 0


@dataclass(frozen=True)
class Drained:
    """What one read of the socket gave: uevents in order, and whether some were lost."""

    uevents: list[Uevent]
    overflowed: bool
    more: bool


# The private parts of pyudev that this module (and no other) relies on, as ``module:attribute
# path``; tests/test_private_members.py checks each against the installed library.
PYUDEV_PRIVATE = ("pyudev:Monitor._receive_device",)


class UdevMonitor:
    """A pyudev netlink monitor (source ``udev``) with a large receive buffer, non-blocking."""

    def __init__(
        self, receive_buffer: int = RECEIVE_BUFFER_BYTES, udev_control: Path = UDEV_CONTROL
    ) -> None:
        self._receive_buffer = receive_buffer
        self._udev_control = udev_control
        self._monitor: Any = None

    def open(self) -> int:
        """Open and start the monitor; return its file descriptor.

        Raises:
            UdevUnavailableError: libudev cannot be loaded or the socket cannot be opened.
        """
        try:
            import pyudev  # libudev is loaded at import: only when a monitor is wanted

            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context, source="udev")
        except (ImportError, OSError) as err:
            raise UdevUnavailableError(f"cannot open a udev monitor: {err}") from err
        if not os.path.exists(self._udev_control):
            log.warning(
                "udev: %s is missing, udevd does not seem to run; changes will be seen only "
                "when udevd runs (or at the next start)",
                self._udev_control,
            )
        try:
            monitor.set_receive_buffer_size(self._receive_buffer)
        except OSError as err:
            log.warning("udev: cannot set a %d byte receive buffer: %s", self._receive_buffer, err)
        try:
            monitor.start()
        except OSError as err:
            raise UdevUnavailableError(f"cannot start the udev monitor: {err}") from err
        self._monitor = monitor
        return int(monitor.fileno())

    def drain(self) -> Drained:
        """Read every uevent waiting on the socket without blocking (at most ``DRAIN_LIMIT``).

        Raises nothing: a lost-events overflow (``ENOBUFS``) is reported in the result, and any
        other receive error is logged.
        """
        uevents: list[Uevent] = []
        overflowed = False
        monitor = self._monitor
        if monitor is None:
            return Drained(uevents, overflowed, more=False)
        while len(uevents) < DRAIN_LIMIT:
            try:
                # Not Monitor.poll(): its poll(2) turns the socket's pending ENOBUFS into a
                # POLLERR without an errno, and the error is never consumed. Receiving directly
                # (the socket is non-blocking) returns None on EAGAIN and raises ENOBUFS once.
                device = monitor._receive_device()
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    log.warning("udev: the receive buffer overflowed; events were lost")
                    overflowed = True
                    continue
                log.warning("udev: cannot receive an event: %s", err)
                break
            if device is None:
                return Drained(uevents, overflowed, more=False)
            uevent = _to_uevent(device.properties)
            if uevent is not None:
                uevents.append(uevent)
        return Drained(uevents, overflowed, more=True)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            # pyudev has no close(); dropping the last reference unrefs the libudev monitor,
            # which closes its socket.
            del monitor


def _to_uevent(properties: Any) -> Uevent | None:
    try:
        action = str(properties.get("ACTION", ""))
        devpath = str(properties.get("DEVPATH", ""))
        subsystem = str(properties.get("SUBSYSTEM", ""))
        seqnum_text = str(properties.get("SEQNUM", "0"))
        driver = str(properties.get("DRIVER", ""))
        mdev_state = str(properties.get("MDEV_STATE", ""))
    except (UnicodeDecodeError, KeyError, ValueError) as err:
        log.warning("udev: an event with unreadable properties was ignored: %s", err)
        return None
    if not action or not devpath.startswith("/") or "\0" in devpath:
        return None
    return Uevent(
        action=action,
        devpath=devpath,
        subsystem=subsystem,
        driver=driver,
        mdev_state=mdev_state,
        seqnum=int(seqnum_text) if seqnum_text.isdigit() else 0,
    )
