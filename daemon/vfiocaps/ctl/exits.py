"""vfiocapsctl's exit statuses, derived for D-Bus errors from the adaptor's one table of names."""

from __future__ import annotations

from ..bus.errors import ERROR_NAMES
from ..cmdline import EXIT_USAGE
from ..errors import (
    BusError,
    BusyError,
    ConfigError,
    InvalidArgumentError,
    NotAuthorizedError,
    NotFoundError,
    NotServingError,
    ProbeBusyError,
    ProbeError,
    UnsafeDirectoryError,
    VfiocapsError,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_UNAVAILABLE = 3
EXIT_BUSY = 4
EXIT_NOT_FOUND = 5
EXIT_NOT_AUTHORIZED = 6
EXIT_INCOMPATIBLE = 7
EXIT_UNDECIDED = 8
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

EXIT_CODES = (
    f"exit status: {EXIT_OK} success; {EXIT_FAILURE} no answer (the probe failed, crashed or "
    f"timed out); {EXIT_USAGE} bad command line or malformed argument; {EXIT_UNAVAILABLE} "
    "vfiocapsd or its bus is not reachable, went away, or does not serve yet or any more; "
    f"{EXIT_BUSY} the device is in use by a VM (not disturbed), or too many requests wait; "
    f"{EXIT_NOT_FOUND} no such device; "
    f"{EXIT_NOT_AUTHORIZED} not authorized; {EXIT_INCOMPATIBLE} and {EXIT_UNDECIDED}: "
    f"'migration check' found the pair incompatible, or could not decide; {EXIT_INTERRUPTED} "
    "interrupted (Ctrl-C)"
)
PROBE_EXIT_CODES = EXIT_CODES

# Error classes to exit statuses, most specific first: the first class an error is an instance
# of gives its status. The D-Bus names below are derived from bus/errors.py through it.
EXIT_BY_ERROR: tuple[tuple[type[VfiocapsError], int], ...] = (
    (NotFoundError, EXIT_NOT_FOUND),
    (InvalidArgumentError, EXIT_USAGE),
    (NotAuthorizedError, EXIT_NOT_AUTHORIZED),
    (ProbeBusyError, EXIT_BUSY),
    (BusyError, EXIT_BUSY),
    (ProbeError, EXIT_FAILURE),
    (UnsafeDirectoryError, EXIT_FAILURE),
    (ConfigError, EXIT_USAGE),
    (BusError, EXIT_UNAVAILABLE),
    (NotServingError, EXIT_UNAVAILABLE),
)


def exit_status_of(error: VfiocapsError) -> int:
    """The exit status for *error* (EXIT_FAILURE for any error the table does not name)."""
    for error_class, status in EXIT_BY_ERROR:
        if isinstance(error, error_class):
            return status
    return EXIT_FAILURE


def _status_of_class(error_class: type[VfiocapsError]) -> int:
    for known, status in EXIT_BY_ERROR:
        if issubclass(error_class, known):
            return status
    return EXIT_FAILURE


# D-Bus error names to exit statuses: the daemon's, from its one table, and the bus's own for a
# daemon that is not there ("timeout" and "no-reply" are the client's names for a silent one).
ERROR_EXIT_CODES: dict[str, int] = {
    **{name: _status_of_class(error_class) for error_class, name in reversed(ERROR_NAMES)},
    "org.freedesktop.DBus.Error.ServiceUnknown": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.NameHasNoOwner": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.NoReply": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.Disconnected": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.AccessDenied": EXIT_NOT_AUTHORIZED,
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": EXIT_NOT_AUTHORIZED,
    "timeout": EXIT_UNAVAILABLE,
    "no-reply": EXIT_UNAVAILABLE,
}
