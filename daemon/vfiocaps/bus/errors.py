"""The one table from vfiocaps errors to ``org.vfiocaps1.Error.*`` names, and the mapping."""

from __future__ import annotations

import logging

from dbus_fast.errors import DBusError

from ..errors import (
    BusyError,
    InvalidArgumentError,
    NeedsGpuInstanceError,
    NotAuthorizedError,
    NotFoundError,
    NotReadyError,
    ProbeBusyError,
    ProbeError,
    ProbeTimeoutError,
    ProfileConflictError,
    ProfileInUseError,
    ProfileNoRoomError,
    ProfileNotPermittedError,
    ProfileUnknownError,
    ShuttingDownError,
    VfiocapsError,
)

log = logging.getLogger(__name__)

ERROR_PREFIX = "org.vfiocaps1.Error."
INTERNAL_ERROR = "org.freedesktop.DBus.Error.Failed"

# Most specific first: the first class an error is an instance of gives its name.
ERROR_NAMES: tuple[tuple[type[VfiocapsError], str], ...] = (
    (NotFoundError, ERROR_PREFIX + "NotFound"),
    (InvalidArgumentError, ERROR_PREFIX + "InvalidArgument"),
    (NotAuthorizedError, ERROR_PREFIX + "NotAuthorized"),
    (ProbeBusyError, ERROR_PREFIX + "Busy"),
    (BusyError, ERROR_PREFIX + "Busy"),
    (ProbeTimeoutError, ERROR_PREFIX + "Timeout"),
    (NeedsGpuInstanceError, ERROR_PREFIX + "NeedsGpuInstance"),
    (ProfileInUseError, ERROR_PREFIX + "ProfileInUse"),
    (ProfileUnknownError, ERROR_PREFIX + "ProfileUnknown"),
    (ProfileConflictError, ERROR_PREFIX + "ProfileConflict"),
    (ProfileNoRoomError, ERROR_PREFIX + "ProfileNoRoom"),
    (ProfileNotPermittedError, ERROR_PREFIX + "ProfileNotPermitted"),
    (ProbeError, ERROR_PREFIX + "ProbeFailed"),
    (NotReadyError, ERROR_PREFIX + "NotReady"),
    (ShuttingDownError, ERROR_PREFIX + "ShuttingDown"),
)


def to_dbus_error(err: BaseException, member: str) -> DBusError:
    """The D-Bus error a caller receives for *err* raised while serving *member*.

    Known errors keep their message; anything else is logged with its traceback and becomes a
    generic failure that discloses nothing of the daemon's internals.
    """
    if isinstance(err, DBusError):
        return err
    for error_class, name in ERROR_NAMES:
        if isinstance(err, error_class):
            return DBusError(name, str(err))
    log.error("internal error in %s", member, exc_info=err)
    return DBusError(INTERNAL_ERROR, f"internal error in {member}; see the daemon's log")
