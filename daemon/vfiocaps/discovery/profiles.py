"""Setting a vGPU profile on a free SR-IOV virtual function for a probe, and clearing it again,
recorded under the runtime directory so that a profile a crash left behind is cleared at start."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import (
    DiscoveryError,
    ProfileConflictError,
    ProfileInUseError,
    ProfileNoRoomError,
    ProfileNotPermittedError,
    ProfileRefusedError,
    ProfileUnknownError,
)
from ..model import Parent
from ..tasks import TaskSet
from ..vfiogroup import group_node, held_elsewhere
from .attributes import AttributeWriteError, write_attribute, write_failure
from .functions import CURRENT_PROFILE, NO_PROFILE, PROFILE_DIR, VirtualFunction
from .profileledger import ProfileError, ProfileLedger, ProfileRecord
from .scan import PCI_DEVICES, HostReader

log = logging.getLogger("vfiocaps.discovery")

__all__ = [
    "LATE_WRITE_SECONDS",
    "WRITE_SECONDS",
    "ProfileError",
    "ProfileLedger",
    "ProfileRecord",
    "ProfileSetter",
    "group_held",
]

# The boot id of a record made where the kernel's could not be read (a unit with
# ProcSubset=pid hides /proc/sys). The runtime directory, on tmpfs under /run, then is what
# ties records to the boot: it does not outlive it.
# A write to current_vgpu_type makes the vendor driver reserve or release GPU resources.
WRITE_SECONDS = 10.0
# A write that missed WRITE_SECONDS is waited for this much longer in the background before
# its record is left for the next start.
LATE_WRITE_SECONDS = 300.0


# What a profile write can fail with: a failure of vfiocapsd's own (ProfileError) or a refusal
# of the vendor driver (ProfileRefusedError, one class per errno).
PROFILE_FAILURES = (ProfileError, ProfileRefusedError)

# The vendor driver's answers to a write of current_vgpu_type (NVIDIA's vendor-VFIO host
# driver, current_vgpu_type_store; the nvidia-vgpu VFIO RFCs): what each means and what to do.
_REFUSALS: dict[int, tuple[type[ProfileRefusedError], str]] = {
    errno.EBUSY: (
        ProfileInUseError,
        "the VF is open (a VM or another tool holds it); close it first",
    ),
    errno.ENODEV: (
        ProfileUnknownError,
        "this card does not know that profile; pick one its creatable_vgpu_types lists",
    ),
    errno.EINVAL: (
        ProfileConflictError,
        "another profile is set on this card, which takes one profile at a time; clear the "
        "others (echo 0) or pick the profile they carry",
    ),
    errno.ENOSPC: (
        ProfileNoRoomError,
        "the card has no room for another VF with it; clear a profile (echo 0) first",
    ),
    errno.EPERM: (
        ProfileNotPermittedError,
        "a vGPU exists on the VF; stop what uses it, then clear its profile",
    ),
}


def refusal(attribute: Path, value: str, err: OSError) -> DiscoveryError:
    """The error for the driver's refusal *err* of writing *value* to *attribute*: a
    :class:`ProfileRefusedError` subclass naming the file, the errno and what to do, or a
    :class:`ProfileError` for any other errno."""
    code = err.errno or 0
    text = write_failure(attribute, value, err)
    known = _REFUSALS.get(code)
    if known is None:
        return ProfileError(text)
    error_class, advice = known
    refused = error_class(f"{text}: {advice}")
    refused.errno = code
    return refused


def group_held(dev_root: Path, group: str) -> bool:
    """Whether the VFIO group node of *group* is open elsewhere (a VM holds the function).

    A node that cannot be opened for another reason counts as held: nothing is done to a
    function one cannot vouch for.
    """
    node = group_node(dev_root, group)
    try:
        return held_elsewhere(node)
    except OSError as err:
        log.warning("profiles: cannot open %s (%s); VF treated as in use", node, err.strerror)
        return True


class ProfileSetter:
    """Sets and clears the vGPU profile of virtual functions for probes.

    A function is chosen only when it has no profile, lists the requested one as creatable,
    carries no record already, and its VFIO group is not held; it is taken by creating its
    record exclusively, so two reservations (threads, or daemons) never take the same one. Every
    write runs in a worker thread bounded by *write_seconds*; a profile is recorded before it
    is set and the record is dropped only once the function is seen without it after the write's
    thread returned (an unreadable ``current_vgpu_type`` is unknown, not gone). A write that
    misses its deadline is waited for in the background (at most *late_seconds*) and the
    function then cleared. Once set, the record notes the attribute's modification time, so
    that a profile an administrator set again later is told apart and left alone.
    """

    def __init__(
        self,
        reader: HostReader,
        ledger: ProfileLedger,
        dev_root: Path,
        *,
        held: Callable[[Path, str], bool] = group_held,
        write_seconds: float = WRITE_SECONDS,
        late_seconds: float = LATE_WRITE_SECONDS,
    ) -> None:
        self._reader = reader
        self._ledger = ledger
        self._dev_root = dev_root
        self._held = held
        self._write_seconds = write_seconds
        self._late_seconds = late_seconds
        self._write_lock = asyncio.Lock()
        # Writes whose thread has not returned yet (they missed their deadline), by function.
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._late = TaskSet("late profile write")

    def _function_dir(self, function: str) -> Path | None:
        sysfs = self._reader.sysfs
        return sysfs.resolve(sysfs.path(f"{PCI_DEVICES}/{function}"))

    def _is_held(self, function_dir: Path) -> bool:
        group = self._reader.iommu_group(str(function_dir))
        if group is None:
            log.warning("profiles: %s has no IOMMU group; treated as in use", function_dir.name)
            return True
        return self._held(self._dev_root, group)

    def current(self, function: str) -> str | None:
        """The profile set on *function* now (``""``: none), ``None`` when unreadable."""
        function_dir = self._function_dir(function)
        if function_dir is None:
            return None
        value = self._reader.sysfs.read_text(function_dir / PROFILE_DIR / CURRENT_PROFILE)
        if value is None or not (value.isascii() and value.isdigit()):
            return None
        return "" if value == NO_PROFILE else str(int(value))

    def stamp(self, function: str) -> str:
        """``current_vgpu_type``'s modification time in ns (``""``: unreadable)."""
        function_dir = self._function_dir(function)
        if function_dir is None:
            return ""
        try:
            attribute = os.stat(function_dir / PROFILE_DIR / CURRENT_PROFILE, follow_symlinks=False)
        except OSError:
            return ""
        return str(attribute.st_mtime_ns)

    def choose(
        self, parent: Parent, profile: str, exclude: frozenset[str] = frozenset()
    ) -> VirtualFunction:
        """A free virtual function of *parent* that can take *profile* now (never one of
        *exclude*: functions already known as VFIO devices).

        Raises:
            ProfileError: none is free (every one has a profile, is held, or is being probed).
        """
        reserved = self._ledger.functions() | exclude
        for function in self._reader.functions.virtual_functions(parent.sysfs_path):
            if function.profile or function.address in reserved:
                continue
            if profile not in {number for number, _ in function.creatable}:
                continue
            if self._is_held(Path(function.sysfs_path)):
                log.info("profiles: %s is in use; not chosen", function.address)
                continue
            return function
        raise ProfileError(f"no free virtual function of {parent.name} can take profile {profile}")

    def reserve(
        self, parent: Parent, profile: str, exclude: frozenset[str] = frozenset()
    ) -> ProfileRecord:
        """Choose a function for *profile* and record the profile before it is set.

        Raises:
            ProfileError: no function is free or the record cannot be written.
        """
        taken: set[str] = set()
        while True:
            function = self.choose(parent, profile, exclude | taken)
            record = ProfileRecord(
                function.address,
                profile,
                parent.name,
                self._ledger.boot_id(),
                str(os.getpid()),
                self._ledger.started(),
            )
            if self._ledger.add(record, exclusive=True):
                return record
            taken.add(function.address)  # reserved by someone else meanwhile: the next one

    async def _write(self, function: str, value: str) -> None:
        function_dir = self._function_dir(function)
        if function_dir is None:
            raise ProfileError(f"virtual function {function} is gone")
        attribute = function_dir / PROFILE_DIR / CURRENT_PROFILE
        work: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(self._write_seconds):
                async with self._write_lock:
                    work = asyncio.ensure_future(
                        asyncio.to_thread(_write_attribute, self._reader, attribute, value)
                    )
                    await asyncio.shield(work)
        except (TimeoutError, asyncio.CancelledError) as err:
            if work is not None and not work.done():
                self._follow_late(function, work)
            if isinstance(err, asyncio.CancelledError):
                raise
            raise ProfileError(
                f"writing {value} to {attribute} did not finish in {self._write_seconds:g} s"
            ) from err

    def _follow_late(self, function: str, work: asyncio.Future[None]) -> None:
        """A write to *function* missed its deadline: once its thread returns, clear what was
        set (the record is kept until then, and past *late_seconds* for the next start)."""
        self._pending[function] = work

        async def follow() -> None:
            try:
                async with asyncio.timeout(self._late_seconds):
                    await asyncio.gather(work, return_exceptions=True)
            except TimeoutError:
                log.error(
                    "profiles: a write to %s has not returned after %g s more; its record is "
                    "kept for the next start",
                    function,
                    self._late_seconds,
                )
                return
            finally:
                if self._pending.get(function) is work:
                    del self._pending[function]
            await self.clear(function)

        self._late.spawn(follow(), name=f"vfiocaps-late-{function}")

    async def close(self) -> None:
        """Stop waiting for late writes (their records stay for the next start)."""
        await self._late.stop()

    async def apply(self, record: ProfileRecord) -> None:
        """Set the recorded profile on its function; on failure, drop the record if the
        function is seen without the profile.

        Raises:
            ProfileError: the function is now held or vanished.
            ProfileRefusedError: the driver refused (a subclass per errno).
        """
        function_dir = self._function_dir(record.function)
        try:
            if function_dir is None or self._is_held(function_dir):
                raise ProfileError(f"{record.function} was taken before its profile was set")
            await self._write(record.function, record.profile)
        except PROFILE_FAILURES:
            now = self.current(record.function)
            # Dropped only when the write has returned and the function is seen without the
            # profile; unreadable is unknown, and a late write is followed up.
            if record.function not in self._pending and now is not None and now != record.profile:
                self._ledger.remove(record.function)
            raise
        stamped = replace(record, stamp=self.stamp(record.function))
        with contextlib.suppress(ProfileError):  # without a stamp it is only recognised less well
            self._ledger.add(stamped)
        log.info("profiles: set profile %s on %s for a probe", record.profile, record.function)

    async def clear(self, function: str) -> bool:
        """Clear the profile vfiocapsd set on *function*; return whether it is clear now.

        A function whose group is held keeps its profile and its record (cleared at a later
        start); one that no longer carries the recorded profile is only forgotten.
        Raises nothing: failures are logged, and the record stays for the next start.
        """
        recorded = {r.function: r for r in self._ledger.records()}.get(function)
        if recorded is None:
            return True
        if function in self._pending:
            log.info("profiles: a write to %s is under way; cleared once it returns", function)
            return False
        now = self.current(function)
        if now is None:
            log.error("profiles: cannot read the profile of %s; its record is kept", function)
            return False
        if now != recorded.profile:
            self._ledger.remove(function)
            return True
        function_dir = self._function_dir(function)
        if function_dir is None or self._is_held(function_dir):
            log.error(
                "profiles: %s is in use with profile %s set for a probe; left as it is, "
                "cleared at a later start once free",
                function,
                recorded.profile,
            )
            return False
        try:
            await self._write(function, NO_PROFILE)
        except PROFILE_FAILURES as err:
            log.error("profiles: cannot clear the profile of %s: %s", function, err)
            return False
        if self.current(function) not in ("", None):
            log.error("profiles: %s still carries a profile after clearing", function)
            return False
        self._ledger.remove(function)
        log.info("profiles: cleared profile %s from %s", recorded.profile, function)
        return True

    async def recover(self) -> list[str]:
        """Clear profiles an earlier vfiocapsd set in this boot and did not clear; return the
        functions cleared. A profile of a vfiocapsd still running is left to it; records of an
        earlier boot are dropped (profiles do not survive a reboot). Raises nothing."""
        cleared = []
        for record in self._ledger.leftovers():
            if record.stamp and self.stamp(record.function) not in (record.stamp, ""):
                log.warning(
                    "profiles: %s was written again since an earlier vfiocapsd set profile %s "
                    "(an administrator's now); left as it is",
                    record.function,
                    record.profile,
                )
                self._ledger.remove(record.function)
                continue
            log.warning(
                "profiles: %s carries profile %s set by an earlier vfiocapsd; clearing it",
                record.function,
                record.profile,
            )
            if await self.clear(record.function):
                cleared.append(record.function)
        return cleared


def _write_attribute(reader: HostReader, attribute: Path, value: str) -> None:
    """:func:`write_attribute`, its failure as a :class:`ProfileError` or, when the driver
    refused the value, as :func:`refusal` maps its errno.

    Raises:
        ProfileError: the attribute is missing, a link or read-only.
        ProfileRefusedError: the driver refused the value (a subclass per errno).
    """
    try:
        write_attribute(reader.sysfs, attribute, value)
    except AttributeWriteError as err:
        if err.refused and isinstance(err.__cause__, OSError):
            raise refusal(err.path, value, err.__cause__) from err
        raise ProfileError(str(err)) from err
