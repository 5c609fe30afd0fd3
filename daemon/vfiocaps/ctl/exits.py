"""vfiocapsctl's exit statuses, and the D-Bus error names that map to them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_BUSY = 4
EXIT_NOT_FOUND = 5
EXIT_NOT_AUTHORIZED = 6
EXIT_INCOMPATIBLE = 7
EXIT_UNDECIDED = 8

EXIT_CODES = (
    f"exit status: {EXIT_OK} success; {EXIT_FAILURE} no answer (the probe failed, crashed or "
    f"timed out); {EXIT_USAGE} bad command line or malformed argument; {EXIT_UNAVAILABLE} "
    f"vfiocapsd is not reachable; {EXIT_BUSY} the device is in use by a VM (not disturbed); "
    f"{EXIT_NOT_FOUND} no such device; {EXIT_NOT_AUTHORIZED} not authorized; "
    f"{EXIT_INCOMPATIBLE} and {EXIT_UNDECIDED}: 'migration check' found the pair incompatible, "
    "or could not decide"
)
PROBE_EXIT_CODES = EXIT_CODES

# D-Bus error names of the daemon (and of the bus) to exit codes.
ERROR_EXIT_CODES = {
    "org.vfiocaps1.Error.NotFound": EXIT_NOT_FOUND,
    "org.vfiocaps1.Error.InvalidArgument": EXIT_USAGE,
    "org.vfiocaps1.Error.NotAuthorized": EXIT_NOT_AUTHORIZED,
    "org.vfiocaps1.Error.Busy": EXIT_BUSY,
    "org.vfiocaps1.Error.Timeout": EXIT_FAILURE,
    "org.vfiocaps1.Error.ProbeFailed": EXIT_FAILURE,
    "org.freedesktop.DBus.Error.ServiceUnknown": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.NameHasNoOwner": EXIT_UNAVAILABLE,
    "org.freedesktop.DBus.Error.NoReply": EXIT_UNAVAILABLE,
    "timeout": EXIT_UNAVAILABLE,
}
