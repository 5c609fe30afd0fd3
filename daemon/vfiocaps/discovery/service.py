"""The discovery service: udev monitor first, then coldplug, then events as the host changes."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path

from ..bootid import BOOT_ID_PATH
from ..config import Config
from ..ids import is_pci_address
from ..model import Device, DeviceAdded, DiscoveryEvent, HostSnapshot, Parent, TypeKind
from ..tasks import TaskSet
from .errors import DiscoveryStateError
from .eventlog import format_event
from .identity import IdentityResolver, ModuleFiles
from .instances import create_instance, instance_exists, remove_instance
from .monitor import Drained, UdevMonitor, Uevent
from .profiles import (
    PROFILE_FAILURES,
    WRITE_SECONDS,
    ProfileError,
    ProfileLedger,
    ProfileRecord,
    ProfileSetter,
)
from .profilewatch import ProfileWatch
from .scan import PCI_DEVICES, HostReader
from .state import HostState
from .sysfs import SysfsTree

log = logging.getLogger("vfiocaps.discovery")

# A burst of uevents (an instance is four, a module load dozens) is gathered into one batch:
# the batch closes once the socket has been quiet for QUIET_SECONDS, or COALESCE_SECONDS after
# its first uevent, whichever comes first. A lone hotplug is published within milliseconds.
COALESCE_SECONDS = 0.02
QUIET_SECONDS = 0.002
# Uevents processed before the loop is given a chance to read the socket again.
CHUNK = 256
# Profile writes still running at close are given this long to finish (they are recorded).
PROFILE_CLOSE_SECONDS = 2 * WRITE_SECONDS
# How long create_instance waits for a profile write, so that a refusal reaches the caller: less
# than the engine gives create_instance, so that a slow write still ends in the usual removal.
PROFILE_WAIT_SECONDS = WRITE_SECONDS / 2


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class DiscoveryState(enum.Enum):
    """Life cycle of :class:`Discovery`."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


def host_reader(sysfs_root: Path, modules_root: Path, kernel_release: str) -> HostReader:
    """The one reader of host objects (parents, types, devices) for a sysfs tree."""
    sysfs = SysfsTree(sysfs_root)
    files = ModuleFiles(modules_root, kernel_release)
    return HostReader(sysfs, IdentityResolver(sysfs, files))


def _reader_for(config: Config) -> HostReader:
    return host_reader(config.sysfs_root, config.modules_root, config.kernel_release)


def read_device(config: Config, sysfs_path: Path) -> Device | None:
    """The VFIO device at *sysfs_path*, read now, or ``None`` if it is not one discovery knows
    (not an mdev bound to a driver, not a VFIO PCI function, absent, outside the sysfs root, or
    unreadable).

    Raises nothing: every problem with the tree is logged and answered with ``None``.
    """
    return _reader_for(config).read_device_path(sysfs_path)


class Discovery:
    """Knows which parents (mdev parents, physical functions whose VFs take vGPU profiles),
    types and VFIO devices exist and tells of every change.

    One consumer iterates :meth:`events`; batches come in the order the host changed.
    """

    def __init__(
        self,
        config: Config,
        *,
        monitor_factory: Callable[[], UdevMonitor] = UdevMonitor,
        coalesce_seconds: float = COALESCE_SECONDS,
        boot_id_path: Path = BOOT_ID_PATH,
    ) -> None:
        self.config = config
        self._reader = _reader_for(config)
        self._profiles = ProfileSetter(
            self._reader,
            ProfileLedger(config.runtime_dir / "profiles", boot_id_path),
            config.dev_root,
        )
        self._profile_tasks = TaskSet("profile")
        self._watch = ProfileWatch(self._reader.sysfs)
        self._watch_task: asyncio.Task[None] | None = None
        self._state = HostState(self._reader)
        self._monitor_factory = monitor_factory
        self._coalesce_seconds = coalesce_seconds
        self._received = 0
        self._lifecycle = DiscoveryState.NEW
        self._monitor: UdevMonitor | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[Uevent] = collections.deque()
        self._overflowed = False
        self._wakeup = asyncio.Event()
        self._batches: asyncio.Queue[list[DiscoveryEvent] | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._snapshot = HostSnapshot()
        self.resyncs = 0

    @property
    def state(self) -> DiscoveryState:
        return self._lifecycle

    @property
    def snapshot(self) -> HostSnapshot:
        """What is known now (kept up to date as batches are processed)."""
        return self._snapshot

    async def start(self) -> HostSnapshot:
        """Open the udev monitor, then read the whole host; return what was found.

        What was found is logged as events (every parent, then ``Resynchronised`` with the
        counts; every device too, at DEBUG: a large host has thousands) but not queued:
        :meth:`events` reports only what changes after this snapshot.

        Raises:
            DiscoveryStateError: called more than once.
            UdevUnavailableError: libudev or its netlink socket cannot be used.
        """
        if self._lifecycle is not DiscoveryState.NEW:
            raise DiscoveryStateError(f"discovery cannot start when {self._lifecycle.value}")
        self._lifecycle = DiscoveryState.STARTING
        self._loop = asyncio.get_running_loop()
        try:
            await self._profiles.recover()
            monitor = self._monitor_factory()
            self._fd = monitor.open()
            self._monitor = monitor
            self._loop.add_reader(self._fd, self._on_readable)
            events = self._state.resync(self._reader.host())
        except BaseException:
            await self.close()
            raise
        self._publish(events, coldplug=True)
        self._watch.changed(self._snapshot)  # what the profile files hold now, as compared later
        self._lifecycle = DiscoveryState.RUNNING
        self._worker = asyncio.create_task(self._work(), name="vfiocaps-discovery")
        self._worker.add_done_callback(self._worker_ended)
        self._watch_task = asyncio.create_task(self._watch_profiles(), name="vfiocaps-profiles")
        snapshot = self._snapshot
        log.info(
            "discovery: %d parents, %d types, %d devices under %s",
            len(snapshot.parents),
            len(snapshot.types),
            len(snapshot.devices),
            self.config.sysfs_root,
        )
        return snapshot

    async def events(self) -> AsyncIterator[list[DiscoveryEvent]]:
        """Batches of domain events until :meth:`close`.

        Raises:
            DiscoveryStateError: discovery was never started.
        """
        if self._lifecycle is DiscoveryState.NEW:
            raise DiscoveryStateError("discovery has not been started")
        while True:
            batch = await self._batches.get()
            if batch is None:
                self._batches.put_nowait(None)  # every later iterator ends too
                return
            yield batch

    async def close(self) -> None:
        """Stop reading udev, end :meth:`events`, release the socket. Idempotent; raises nothing."""
        if self._lifecycle is DiscoveryState.CLOSED:
            return
        self._lifecycle = DiscoveryState.CLOSED
        try:
            # Setting or clearing a profile is finished (or left recorded), not cut short.
            await self._profile_tasks.settle(PROFILE_CLOSE_SECONDS)
            await self._profiles.close()  # late writes keep their records for the next start
            watch, self._watch_task = self._watch_task, None
            if watch is not None:
                watch.cancel()
                await asyncio.wait({watch})
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.cancel()
                # Waits for the worker to end without raising its cancellation here; a
                # cancellation of close() itself still propagates.
                await asyncio.wait({worker})
        finally:
            if self._fd is not None and self._loop is not None:
                self._loop.remove_reader(self._fd)
            self._fd = None
            if self._monitor is not None:
                self._monitor.close()
                self._monitor = None
            self._batches.put_nowait(None)

    # ---- inside -----------------------------------------------------------------------------

    def create_instance(self, parent: Parent, type_id: str, uuid: str = "") -> str:
        """Create a temporary instance of *type_id* on *parent*; return its device id.

        For an mdev type, the instance *uuid* (chosen and recorded by the caller first). For a
        vGPU profile, the address of a free virtual function of *parent*: the profile is
        recorded, then set (bounded, off the event loop); called off the loop, this waits for
        the write (at most ``PROFILE_WAIT_SECONDS``), so that a refusal of the driver reaches
        the caller; the function then appears as a device.

        Raises:
            InstanceError: the kernel refused or the type does not exist.
            ProfileError: no virtual function is free or the record cannot be written.
            ProfileRefusedError: the driver refused the profile (named by its errno).
        """
        mdev_type = self._snapshot.types.get((parent.name, type_id))
        if mdev_type is None or mdev_type.kind is not TypeKind.VF_PROFILE:
            return create_instance(self.config.sysfs_root, parent, type_id, uuid)
        known = frozenset(self._snapshot.devices)
        record = self._profiles.reserve(parent, type_id, exclude=known)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._spawn_profile_task(lambda: self._set_profile(record, done), record.function)
        if _on_loop():
            return record.function  # the write's outcome is logged
        try:
            done.result(timeout=PROFILE_WAIT_SECONDS)
        except concurrent.futures.TimeoutError:
            # Still writing: the caller waits for the VF and removes it (clearing the profile)
            # as for any instance; returning in time keeps that path.
            log.warning(
                "discovery: setting profile %s on %s takes over %g s",
                type_id,
                record.function,
                PROFILE_WAIT_SECONDS,
            )
        return record.function

    def remove_instance(self, device: Device) -> None:
        """Remove an instance :meth:`create_instance` made: an mdev is removed; a virtual
        function's profile is cleared in the background (only a profile vfiocapsd recorded,
        never on a function a VM holds).

        Raises:
            InstanceError: the kernel refused (the mdev is in use).
        """
        if not is_pci_address(device.device_id):
            remove_instance(self.config.sysfs_root, device)
            return
        self._spawn_profile_task(lambda: self._clear_profile(device.device_id), device.device_id)

    def instance_exists(self, device_id: str) -> bool:
        """Whether the mdev instance *device_id* exists in sysfs now. Raises nothing."""
        return instance_exists(self.config.sysfs_root, device_id)

    def _spawn_profile_task(
        self, work: Callable[[], Coroutine[object, object, None]], function: str
    ) -> None:
        """Run *work* on discovery's loop; callers may be on it or in a worker thread (the
        engine does sysfs writes off the loop)."""

        def spawn() -> None:
            self._profile_tasks.spawn(work(), name=f"vfiocaps-profile-{function}")

        if _on_loop():
            spawn()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(spawn)
        else:
            raise ProfileError("discovery is not running: no profile can be set or cleared")

    async def _set_profile(
        self, record: ProfileRecord, done: concurrent.futures.Future[None]
    ) -> None:
        try:
            await self._profiles.apply(record)
        except PROFILE_FAILURES as err:
            log.error(
                "discovery: cannot set profile %s on %s: %s", record.profile, record.function, err
            )
            done.set_exception(err)
        else:
            done.set_result(None)
        finally:
            if not done.done():  # cancelled
                done.set_exception(ProfileError("discovery stopped while setting the profile"))
            self._reread_function(record.function)

    # ---- profiles set by other tools --------------------------------------------------------

    def recheck_profiles(self) -> list[str]:
        """Compare every known VF's profile with what is known and read each that differs again
        (a profile another tool set or cleared sends no uevent); return those functions.
        Raises nothing."""
        if self._lifecycle is not DiscoveryState.RUNNING:
            return []
        changed = self._watch.changed(self._snapshot)
        for function in changed:
            self._reread_function(function)
        return changed

    async def _watch_profiles(self) -> None:
        """A pass every ``profile_scan_seconds`` while profile parents exist."""
        while True:
            await asyncio.sleep(self.config.profile_scan_seconds)
            if self._snapshot.functions:
                self.recheck_profiles()

    async def _clear_profile(self, function: str) -> None:
        await self._profiles.clear(function)
        self._reread_function(function)

    def _reread_function(self, function: str) -> None:
        """Read a virtual function (and so its physical function's profiles) again, as if it
        had sent a ``change`` uevent: drivers need not send one when a profile changes."""
        sysfs = self._reader.sysfs
        real = sysfs.resolve(sysfs.path(f"{PCI_DEVICES}/{function}"))
        if real is None or self._lifecycle is DiscoveryState.CLOSED:
            return
        devpath = "/" + str(real.relative_to(sysfs.root))
        self._pending.append(Uevent("change", devpath, "pci"))
        self._received += 1
        self._wakeup.set()

    def _on_readable(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        drained: Drained = monitor.drain()
        self._pending.extend(drained.uevents)
        self._received += len(drained.uevents)
        if drained.overflowed:
            self._overflowed = True
        if drained.uevents or drained.overflowed:
            self._wakeup.set()

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            await self._gather_burst()
            self._wakeup.clear()
            events: list[DiscoveryEvent] = []
            uevents = 0
            profiles_touched = False
            while self._pending:
                uevents += min(CHUNK, len(self._pending))
                for _ in range(min(CHUNK, len(self._pending))):
                    uevent = self._pending.popleft()
                    profiles_touched = profiles_touched or self._touches_profiles(uevent)
                    events.extend(self._apply(uevent))
                self._snapshot = self._state.snapshot()
                if self._pending:
                    await asyncio.sleep(0)
            if self._overflowed:
                self._overflowed = False
                self.resyncs += 1
                log.warning("discovery: events were lost; reading the host again")
                events.extend(self._state.resync(self._reader.host()))
            log.debug("discovery: %d uevents gave %d events", uevents, len(events))
            self._publish(events)
            if profiles_touched:
                # A uevent of a PF or VF: its siblings may have changed without one.
                self.recheck_profiles()

    def _touches_profiles(self, uevent: Uevent) -> bool:
        name = uevent.devpath.rpartition("/")[2]
        return name in self._snapshot.functions or name in self._snapshot.parents

    async def _gather_burst(self) -> None:
        """Wait until the uevents of a burst have arrived (quiet socket) or the window closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._coalesce_seconds
        while True:
            seen = self._received
            await asyncio.sleep(min(QUIET_SECONDS, max(0.0, deadline - loop.time())))
            if self._received == seen or loop.time() >= deadline:
                return

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("discovery stopped following the host: internal error", exc_info=error)
            self._batches.put_nowait(None)

    def _apply(self, uevent: Uevent) -> list[DiscoveryEvent]:
        try:
            return self._state.apply(uevent)
        except (OSError, ValueError) as err:
            log.warning(
                "discovery: %s %s could not be followed: %s", uevent.action, uevent.devpath, err
            )
            return []

    def _publish(self, events: list[DiscoveryEvent], coldplug: bool = False) -> None:
        """Log *events* and queue them for :meth:`events`; the coldplug is only logged, and its
        devices at DEBUG (thousands of lines at every start would hit journald's rate limit)."""
        self._snapshot = self._state.snapshot()
        for event in events:
            level = logging.DEBUG if coldplug and isinstance(event, DeviceAdded) else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "%s", format_event(event))
        if events and not coldplug:
            self._batches.put_nowait(events)
