"""The one error root of vfiocaps and the hierarchy every layer raises from.

Every error the daemon raises on purpose derives from :class:`VfiocapsError`; anything else that
escapes a layer is a bug and is logged as an internal error by whoever catches it last::

    VfiocapsError
     +-- ConfigError                     bad command line, environment or configuration value
     |    +-- UnsafeDirectoryError       a state directory others could change or plant files in
     |    +-- notify.NotifyError         $NOTIFY_SOCKET is malformed or unreachable
     +-- BusError                        the message bus refused us or went away
     |    +-- NameTakenError             another process already owns the well-known name
     +-- InvalidArgumentError            a caller's value is malformed (id, path, driver name)
     +-- NotFoundError                   a well-formed id that names no known device or type
     +-- NotAuthorizedError              the caller may not change state
     +-- BusyError                       too many requests are waiting; the caller may retry later
     +-- NotServingError                 the daemon is not serving (see runstate.RunState)
     |    +-- NotReadyError              still starting or learning the host; call again soon
     |    +-- ShuttingDownError          stopping; call again once it is started anew
     +-- RunStateError                   a run-state change the daemon's life cycle does not allow
     +-- DiscoveryError                  sysfs or udev could not be read as expected
     |    +-- discovery.UdevUnavailableError   libudev or its monitor cannot be opened
     |    +-- discovery.DiscoveryStateError    a call the discovery state does not allow
     |    +-- discovery.InstanceError          an mdev instance cannot be created or removed
     |    +-- discovery.ProfileError           a vGPU profile cannot be set on or cleared from a VF
     |    +-- discovery.AttributeWriteError    a sysfs attribute cannot be written (or was refused)
     |    +-- ProfileRefusedError        the vendor driver refused a profile write (errno below)
     |         +-- ProfileInUseError          EBUSY: the VF is open (a VM holds it)
     |         +-- ProfileUnknownError        ENODEV: the card does not know the profile
     |         +-- ProfileConflictError       EINVAL: another profile is set on the card
     |         +-- ProfileNoRoomError         ENOSPC: the card has no room left for it
     |         +-- ProfileNotPermittedError   EPERM: a vGPU exists on the VF
     +-- ProbeError                      a probe could not give an answer
     |    +-- ProbeBusyError             the device is held by someone else (a VM); never disturbed
     |    +-- ProbeTimeoutError          the probe QEMU did not answer in time
     |    +-- NeedsGpuInstanceError      a MIG-backed profile needs a GPU instance made first
     |    +-- prober.QemuMissingError    the QEMU binary is missing or cannot be executed
     |    +-- prober.QemuUnusableError   the binary does not answer like QEMU
     |    +-- prober.ProbeSandboxError   the probe user or the sandbox is unusable
     |    +-- prober.GrantError          a device node cannot be lent or is lent by another process
     |    +-- prober.UnsupportedArchitectureError  no machine type for this architecture
     +-- StoreError                      the capability cache cannot be read or written
     |    +-- store.StoreCorruptError    the database is damaged (it is moved aside and rebuilt)
     |    +-- store.StoreUnavailableError  the database cannot be opened or created at all
     +-- HardeningError                  a restriction the daemon puts on itself was refused
     +-- process.ProcessStartError       a program could not be started at all
     +-- client.ClientError              the daemon answered a client's call with an error

Subsystems refine these in their own package (named above as ``package.Class``, and exported
from it), always below one of the classes defined here, so that the D-Bus adaptor maps every
error through one table. A test checks that this tree names every error class.
"""

from __future__ import annotations


class VfiocapsError(Exception):
    """Root of every error vfiocaps raises on purpose."""


class ConfigError(VfiocapsError):
    """A command-line option, environment variable or configuration value is invalid."""


class UnsafeDirectoryError(ConfigError):
    """A cache or runtime directory is a link, foreign, or writable by other users."""


class BusyError(VfiocapsError):
    """Too many requests are waiting already (from this caller or in total); try again later."""


class NotServingError(VfiocapsError):
    """The daemon is not serving: a call that needs a learned host cannot be answered now."""


class NotReadyError(NotServingError):
    """The daemon is still starting or learning the host."""


class ShuttingDownError(NotServingError):
    """The daemon is stopping."""


class RunStateError(VfiocapsError):
    """A run-state change the daemon's life cycle does not allow (a programming error)."""


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


class DiscoveryError(VfiocapsError):
    """sysfs or udev could not be read as expected."""


class ProfileRefusedError(DiscoveryError):
    """The vendor driver refused a write to a VF's ``current_vgpu_type``; ``errno`` says why."""

    errno = 0


class ProfileInUseError(ProfileRefusedError):
    """EBUSY: the virtual function is open (a VM or another tool holds it)."""


class ProfileUnknownError(ProfileRefusedError):
    """ENODEV: the card does not know the profile id."""


class ProfileConflictError(ProfileRefusedError):
    """EINVAL: another profile is set on the card, which takes one profile at a time."""


class ProfileNoRoomError(ProfileRefusedError):
    """ENOSPC: the card has no room left for another VF with this profile."""


class ProfileNotPermittedError(ProfileRefusedError):
    """EPERM: a vGPU exists on the virtual function."""


class ProbeError(VfiocapsError):
    """A capability probe could not produce an answer."""


class ProbeBusyError(ProbeError):
    """The device is in use (for example by a running VM) and must not be disturbed."""


class ProbeTimeoutError(ProbeError):
    """The probe did not complete within its deadline."""


class NeedsGpuInstanceError(ProbeError):
    """A MIG-backed profile cannot be set before MIG mode is on and a GPU instance exists;
    vfiocapsd does not make GPU instances."""


class StoreError(VfiocapsError):
    """The capability cache could not be read or written."""


class HardeningError(VfiocapsError):
    """A restriction the daemon puts on its own process could not be applied."""
