"""The one error root of vfiocaps and the hierarchy every layer raises from.

Every error the daemon raises on purpose derives from :class:`VfiocapsError`; anything else that
escapes a layer is a bug and is logged as an internal error by whoever catches it last::

    VfiocapsError
     +-- ConfigError            bad command line, environment or configuration value
     +-- BusError               the message bus refused us or went away
     |    +-- NameTakenError    another process already owns the well-known name
     +-- InvalidArgumentError   a caller's value is malformed (id, path, driver name)
     +-- NotFoundError          a well-formed id that names no known device or type
     +-- NotAuthorizedError     the caller may not change state
     +-- CallLimitError         the caller has too many calls waiting already
     +-- DiscoveryError         sysfs or udev could not be read as expected
     +-- ProbeError             a probe could not give an answer
     |    +-- ProbeBusyError    the device is held by someone else (a VM); never disturbed
     |    +-- ProbeTimeoutError the probe QEMU did not answer in time
     +-- StoreError             the capability cache cannot be read or written
     +-- HardeningError         a restriction the daemon puts on itself was refused

Subsystems may refine these further (the prober's outcomes, the store's corruption) but always
below one of the classes above, so that the D-Bus adaptor maps every error through one table.
"""

from __future__ import annotations


class VfiocapsError(Exception):
    """Root of every error vfiocaps raises on purpose."""


class ConfigError(VfiocapsError):
    """A command-line option, environment variable or configuration value is invalid."""


class BusError(VfiocapsError):
    """The message bus could not be used: connection refused, lost, or name request denied."""


class NameTakenError(BusError):
    """The well-known bus name is already owned by another connection."""


class InvalidArgumentError(VfiocapsError):
    """A caller supplied a malformed value."""


class NotFoundError(VfiocapsError):
    """A well-formed identifier names nothing that is known."""


class NotAuthorizedError(VfiocapsError):
    """The caller is not allowed to perform a state-changing operation."""


class CallLimitError(VfiocapsError):
    """A caller has as many calls waiting as it may; it can call again when one has returned."""


class DiscoveryError(VfiocapsError):
    """sysfs or udev could not be read as expected."""


class ProbeError(VfiocapsError):
    """A capability probe could not produce an answer."""


class ProbeBusyError(ProbeError):
    """The device is in use (for example by a running VM) and must not be disturbed."""


class ProbeTimeoutError(ProbeError):
    """The probe did not complete within its deadline."""


class StoreError(VfiocapsError):
    """The capability cache could not be read or written."""


class HardeningError(VfiocapsError):
    """A restriction the daemon puts on its own process could not be applied."""
