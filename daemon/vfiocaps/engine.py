"""The engine: turns discovery events into cached capabilities with as few probes as truth allows.

It knows devices, cache keys, probes and records; it knows nothing of D-Bus. Consumers (the D-Bus
adaptor) subscribe with an :class:`EngineListener` and read :class:`DeviceView` values.

Probe scheduling: one probe per :class:`CapabilityKey` at a time, shared by every device that has
that key; at most ``probe_concurrency`` probes run at once; keys with waiting devices go first;
failures are cached with an exponential retry time; a busy device (held by a VM) is never
disturbed: another instance of the same key is tried, else the key is retried later.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .capabilities import Capabilities, ProbeOutcome, ProbeReport
from .config import Config
from .errors import (
    DiscoveryError,
    NotFoundError,
    ProbeBusyError,
    ProbeError,
    ProbeTimeoutError,
    StoreError,
)
from .model import (
    Device,
    DeviceAdded,
    DeviceKind,
    DeviceRemoved,
    DiscoveryEvent,
    DriverChanged,
    DriverIdentity,
    HostSnapshot,
    MdevType,
    Parent,
    ParentRegistered,
    ParentUnregistered,
    Resynchronised,
)
from .store import (
    CapabilityKey,
    CapabilityRecord,
    CapabilityStore,
    KnownDevice,
    ProbeHistoryEntry,
    QemuIdentity,
)
from .store.sqlite import StoreCorruptError

log = logging.getLogger(__name__)

FAILURE_BACKOFF_MAX = 3600.0
INSTANCE_APPEAR_SECONDS = 10.0
QEMU_CHECK_SECONDS = 30.0
STORE_RETRY_SECONDS = 5.0


class ProbeState(enum.Enum):
    """Where a device stands with respect to its capabilities."""

    PENDING = "pending"
    PROBING = "probing"
    DONE = "done"
    FAILED = "failed"
    BUSY = "busy"


class DeviceSource(Protocol):
    """What the engine needs from discovery."""

    @property
    def snapshot(self) -> HostSnapshot: ...

    async def start(self) -> HostSnapshot: ...

    def events(self) -> AsyncIterator[list[DiscoveryEvent]]: ...

    async def close(self) -> None: ...

    def create_instance(self, parent: Parent, type_id: str) -> str: ...

    def remove_instance(self, device: Device) -> None: ...


class ProbeRunner(Protocol):
    """What the engine needs from the prober."""

    async def qemu_identity(self) -> QemuIdentity: ...

    async def probe(self, device: Device, parent: Parent | None) -> ProbeReport: ...


@dataclass(frozen=True, slots=True)
class DeviceView:
    """A device as consumers see it: discovery's facts plus what the cache says."""

    device: Device
    driver: DriverIdentity | None
    type_name: str
    state: ProbeState
    capabilities: Capabilities | None = None
    probed_at_us: int = 0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class TypeView:
    """An mdev type (or a PCI device type) with its live instances and cached answer."""

    parent: str
    type_id: str
    name: str
    description: str
    device_api: str
    available_instances: int
    instances: int
    driver: DriverIdentity | None
    capabilities: Capabilities | None


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """Daemon-wide state for the Manager interface."""

    qemu: QemuIdentity | None
    kernel_release: str
    kvm_available: bool
    probing: bool
    device_count: int
    probes_launched: int
    cache_state: str


class EngineListener(Protocol):
    """Callbacks the engine makes; they must be quick and must not raise."""

    def device_added(self, view: DeviceView) -> None: ...

    def device_changed(self, view: DeviceView) -> None: ...

    def device_removed(self, device_id: str) -> None: ...

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None: ...

    def status_changed(self, status: EngineStatus) -> None: ...


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class _DeviceEntry:
    device: Device
    key: CapabilityKey | None
    state: ProbeState = ProbeState.PENDING
    last_error: str = ""


@dataclass(slots=True)
class _ProbeJob:
    key: CapabilityKey
    future: asyncio.Future[CapabilityRecord]
    tried: set[str] = field(default_factory=set)


class Engine:
    """Owns the live devices, the in-memory cache and the probe queue."""

    def __init__(
        self,
        config: Config,
        source: DeviceSource,
        runner: ProbeRunner,
        store: CapabilityStore,
        *,
        clock_us: Callable[[], int] = _now_us,
    ) -> None:
        self.config = config
        self._source = source
        self._runner = runner
        self._store = store
        self._clock_us = clock_us
        self._listeners: list[EngineListener] = []
        self._devices: dict[str, _DeviceEntry] = {}
        self._records: dict[CapabilityKey, CapabilityRecord] = {}
        self._jobs: dict[CapabilityKey, _ProbeJob] = {}
        self._queue: asyncio.PriorityQueue[tuple[int, int, CapabilityKey]] = asyncio.PriorityQueue()
        self._sequence = itertools.count()
        self._retry_timers: dict[CapabilityKey, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running_probes = 0
        self._qemu: QemuIdentity | None = None
        self._qemu_stat: tuple[int, int] | None = None
        self._probes_launched = 0
        self._dirty: dict[CapabilityKey, CapabilityRecord | None] = {}
        self._history: list[ProbeHistoryEntry] = []
        self._devices_dirty = False
        self._store_wakeup = asyncio.Event()
        self._flushing: asyncio.Future[bool] | None = None
        self._cache_state = "ok"
        self._started = asyncio.Event()
        self._device_waiters: dict[str, asyncio.Future[None]] = {}
        self._type_probes: set[tuple[str, str]] = set()
        self._idle_types_wakeup = asyncio.Event()
        self._status_deferred = False
        self._status_pending = False

    # ---- subscription -------------------------------------------------------------------

    def subscribe(self, listener: EngineListener) -> None:
        """Receive every change from now on."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: EngineListener) -> None:
        """Stop receiving changes. Idempotent."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, call: Callable[[EngineListener], None]) -> None:
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception:  # a listener bug must not stop the engine
                log.exception("an engine listener failed")

    # ---- queries --------------------------------------------------------------------------

    @property
    def status(self) -> EngineStatus:
        """Daemon-wide state."""
        kvm = self.config.dev_root / "kvm"
        return EngineStatus(
            qemu=self._qemu,
            kernel_release=self.config.kernel_release,
            kvm_available=os.access(kvm, os.R_OK | os.W_OK),
            probing=self._running_probes > 0,
            device_count=len(self._devices),
            probes_launched=self._probes_launched,
            cache_state=self._cache_state,
        )

    def device_ids(self) -> list[str]:
        """Ids of the live devices, sorted."""
        return sorted(self._devices)

    def view(self, device_id: str) -> DeviceView:
        """The current view of one device.

        Raises:
            NotFoundError: no live device has this id.
        """
        return self._view(self._live_entry(device_id))

    def probe_state(self, device_id: str) -> ProbeState:
        """Where a live device stands, without building its view.

        Raises:
            NotFoundError: no live device has this id.
        """
        return self._live_entry(device_id).state

    def _live_entry(self, device_id: str) -> _DeviceEntry:
        """The entry of a live device.

        Raises:
            NotFoundError: no live device has this id.
        """
        entry = self._devices.get(device_id)
        if entry is None:
            raise NotFoundError(f"no device {device_id!r}")
        return entry

    def views(self) -> list[DeviceView]:
        """Views of every live device, sorted by id."""
        return [self._view(self._devices[i]) for i in sorted(self._devices)]

    def find(self, *, device_id: str | None = None, sysfs_path: str | None = None) -> DeviceView:
        """Find a live device by id or by its resolved sysfs path.

        Raises:
            NotFoundError: nothing matches.
        """
        if device_id is not None:
            return self.view(device_id)
        for entry in self._devices.values():
            if entry.device.sysfs_path == sysfs_path:
                return self._view(entry)
        raise NotFoundError(f"no device at {sysfs_path!r}")

    def types(self) -> list[TypeView]:
        """Every mdev type of every registered parent, plus the types of live PCI devices."""
        snapshot = self._source.snapshot
        counts: dict[tuple[str, str], int] = {}
        for entry in self._devices.values():
            ident = (entry.device.parent, entry.device.type_id)
            counts[ident] = counts.get(ident, 0) + 1
        result: list[TypeView] = []
        seen: set[tuple[str, str]] = set()
        for (parent_name, type_id), mdev_type in sorted(snapshot.types.items()):
            parent = snapshot.parents.get(parent_name)
            driver = parent.driver if parent else None
            result.append(
                TypeView(
                    parent=parent_name,
                    type_id=type_id,
                    name=mdev_type.name,
                    description=mdev_type.description,
                    device_api=mdev_type.device_api,
                    available_instances=mdev_type.available_instances,
                    instances=counts.get((parent_name, type_id), 0),
                    driver=driver,
                    capabilities=self._type_capabilities(parent, mdev_type),
                )
            )
            seen.add((parent_name, type_id))
        for entry in sorted(self._devices.values(), key=lambda e: e.device.device_id):
            device = entry.device
            ident = (device.parent, device.type_id)
            if ident in seen:
                continue
            seen.add(ident)
            record = self._records.get(entry.key) if entry.key else None
            result.append(
                TypeView(
                    parent=device.parent,
                    type_id=device.type_id,
                    name=device.type_name,
                    description="",
                    device_api=device.device_api,
                    available_instances=0,
                    instances=counts.get(ident, 0),
                    driver=self._driver_of(device),
                    capabilities=record.capabilities if record else None,
                )
            )
        return result

    def _type_capabilities(self, parent: Parent | None, mdev_type: MdevType) -> Capabilities | None:
        if parent is None or parent.driver is None or self._qemu is None:
            return None
        key = self._make_key(parent.driver, parent.pci_id, mdev_type.type_id)
        record = self._records.get(key)
        return record.capabilities if record else None

    # ---- keys -----------------------------------------------------------------------------

    def _driver_of(self, device: Device) -> DriverIdentity | None:
        if device.kind is DeviceKind.MDEV:
            parent = self._source.snapshot.parents.get(device.parent)
            if parent is not None and parent.driver is not None:
                return parent.driver
        return device.driver

    def _parent_pci_id(self, device: Device) -> str:
        if device.kind is DeviceKind.PCI:
            if device.pci_vendor is None or device.pci_device is None:
                return ""
            return f"{device.pci_vendor:04x}:{device.pci_device:04x}"
        parent = self._source.snapshot.parents.get(device.parent)
        return parent.pci_id if parent else ""

    def _make_key(self, driver: DriverIdentity, pci_id: str, type_id: str) -> CapabilityKey:
        qemu = self._qemu
        return CapabilityKey(
            driver=driver.module,
            driver_version=driver.version,
            kernel_release=self.config.kernel_release,
            parent_pci_id=pci_id,
            type_id=type_id,
            qemu_path=qemu.path if qemu else str(self.config.qemu_binary),
            qemu_version=qemu.version if qemu else "",
            qemu_ctime_ns=qemu.ctime_ns if qemu else 0,
        )

    def _key_for(self, device: Device) -> CapabilityKey | None:
        driver = self._driver_of(device)
        if driver is None or self._qemu is None:
            return None
        return self._make_key(driver, self._parent_pci_id(device), device.type_id)

    def _view(self, entry: _DeviceEntry) -> DeviceView:
        record = self._records.get(entry.key) if entry.key else None
        snapshot = self._source.snapshot
        type_name = entry.device.type_name
        mdev_type = snapshot.types.get((entry.device.parent, entry.device.type_id))
        if not type_name and mdev_type is not None:
            type_name = mdev_type.name
        capabilities = record.capabilities if record else None
        return DeviceView(
            device=entry.device,
            driver=self._driver_of(entry.device),
            type_name=type_name,
            state=entry.state,
            capabilities=capabilities if entry.state is ProbeState.DONE else None,
            probed_at_us=record.probed_at_us if record else 0,
            last_error=entry.last_error,
        )

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Open the cache, learn the host, and follow its changes until cancelled.

        Raises:
            asyncio.CancelledError: when stopped; everything started here is stopped first.
        """
        try:
            await self._open_store()
            await self._check_qemu(initial=True)
            self._purge_stale_records()
            for _ in range(self.config.probe_concurrency):
                self._spawn(self._probe_worker())
            self._spawn(self._store_writer())
            self._spawn(self._qemu_watcher())
            snapshot = await self._source.start()
            with self._one_status_update():
                self._apply_snapshot(snapshot)
            if self.config.probe_types_without_instances:
                self._spawn(self._idle_type_prober())
                self._idle_types_wakeup.set()
            self._started.set()
            self._emit_status()
            async for batch in self._source.events():
                with self._one_status_update():
                    for event in batch:
                        self._handle(event)
        finally:
            await self._shutdown()

    async def wait_started(self) -> None:
        """Wait until the initial enumeration has been applied."""
        await self._started.wait()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("engine task failed", exc_info=task.exception())

    async def _shutdown(self) -> None:
        for handle in self._retry_timers.values():
            handle.cancel()
        self._retry_timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._jobs.values():
            if not job.future.done():
                job.future.cancel()
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._flush_store()
        await self._source.close()
        await self._store.close()

    # ---- store ----------------------------------------------------------------------------

    async def _open_store(self) -> None:
        try:
            await self._store.open()
            records = await self._store.load_records()
        except StoreError as err:
            self._set_cache_state(f"degraded: {err}")
            log.error("cache unavailable, serving from memory: %s", err)
            return
        self._records = {record.key: record for record in records}
        log.info("cache %s: %d records", self._store.path, len(records))

    def _set_cache_state(self, state: str) -> None:
        if state != self._cache_state:
            self._cache_state = state
            self._emit_status()

    def _remember(self, record: CapabilityRecord) -> None:
        self._records[record.key] = record
        self._dirty[record.key] = record
        self._store_wakeup.set()

    def _forget(self, keys: Iterable[CapabilityKey]) -> int:
        count = 0
        for key in list(keys):
            if self._records.pop(key, None) is not None:
                count += 1
            self._dirty[key] = None
        self._store_wakeup.set()
        return count

    async def _store_writer(self) -> None:
        while True:
            await self._store_wakeup.wait()
            self._store_wakeup.clear()
            # A write cancelled half-way would leave its transaction open: a stop lets the
            # write in flight finish (see _shutdown) instead.
            self._flushing = asyncio.ensure_future(self._flush_store())
            if not await asyncio.shield(self._flushing):
                await asyncio.sleep(STORE_RETRY_SECONDS)
                self._store_wakeup.set()

    async def _flush_store(self) -> bool:
        """Write what changed; on failure keep it for the next attempt. Returns success."""
        if not (self._dirty or self._history or self._devices_dirty):
            return True
        dirty, history = dict(self._dirty), list(self._history)
        try:
            if not self._store.is_open:
                await self._store.open()
                dirty = {key: self._records.get(key) for key in set(dirty) | set(self._records)}
            puts = [record for record in dirty.values() if record is not None]
            deletes = [key for key, record in dirty.items() if record is None]
            if puts:
                await self._store.put_records(puts)
            if deletes:
                await self._store.delete_records(deletes)
            if history:
                await self._store.add_history(history)
            if self._devices_dirty:
                self._devices_dirty = False
                await self._store.replace_known_devices(self._known_devices())
        except StoreCorruptError as err:
            log.error("cache corrupt while writing: %s", err)
            try:
                await self._store.recover(str(err))
            except StoreError as recover_err:
                self._set_cache_state(f"degraded: {recover_err}")
                return False
            self._dirty = {key: record for key, record in self._records.items()}
            self._devices_dirty = True
            return False
        except StoreError as err:
            self._devices_dirty = True
            self._set_cache_state(f"degraded: {err}")
            log.warning("cache write failed, keeping changes in memory: %s", err)
            return False
        for key, record in dirty.items():
            if self._dirty.get(key, record) is record:
                self._dirty.pop(key, None)
        del self._history[: len(history)]
        self._set_cache_state("ok")
        return True

    def _known_devices(self) -> list[KnownDevice]:
        now = self._clock_us()
        known = []
        for entry in self._devices.values():
            driver = self._driver_of(entry.device)
            known.append(
                KnownDevice(
                    device_id=entry.device.device_id,
                    kind=entry.device.kind.value,
                    sysfs_path=entry.device.sysfs_path,
                    parent=entry.device.parent,
                    type_id=entry.device.type_id,
                    driver=driver.module if driver else "",
                    driver_version=driver.version if driver else "",
                    last_seen_us=now,
                )
            )
        return known

    # ---- QEMU and kernel identity ---------------------------------------------------------

    async def _check_qemu(self, initial: bool = False) -> None:
        path = self.config.qemu_binary
        try:
            st = os.stat(path)
        except OSError as err:
            if self._qemu is not None or initial:
                log.warning("QEMU binary %s unusable: %s", path, err)
            self._qemu_stat = None
            return
        stat_key = (st.st_ctime_ns, st.st_size)
        if stat_key == self._qemu_stat and self._qemu is not None:
            return
        version = None
        if self._store.is_open:
            try:
                version = await self._store.qemu_version(str(path), *stat_key)
            except StoreError as err:
                log.debug("QEMU version lookup failed: %s", err)
        if version is None:
            try:
                identity = await self._runner.qemu_identity()
            except ProbeError as err:
                log.warning("cannot identify QEMU %s: %s", path, err)
                return
            version = identity.version
            if self._store.is_open:
                try:
                    await self._store.remember_qemu_version(str(path), *stat_key, version)
                except StoreError as err:
                    log.debug("cannot remember the QEMU version: %s", err)
        old = self._qemu
        self._qemu = QemuIdentity(str(path), version, st.st_ctime_ns)
        self._qemu_stat = stat_key
        if old is not None and old != self._qemu:
            log.info("QEMU changed: %s -> %s", old.version, version)
            stale = [key for key in self._records if key.qemu_ctime_ns != st.st_ctime_ns]
            count = self._forget(stale)
            self._emit_invalidated("qemu", old.version, version, count)
            self._rekey_all()
        self._emit_status()

    async def _qemu_watcher(self) -> None:
        while True:
            await asyncio.sleep(QEMU_CHECK_SECONDS)
            await self._check_qemu()

    def _purge_stale_records(self) -> None:
        """Drop records made under another kernel or another QEMU binary (at start)."""
        by_kernel: dict[str, list[CapabilityKey]] = {}
        stale_qemu: list[CapabilityKey] = []
        for key in self._records:
            if key.kernel_release != self.config.kernel_release:
                by_kernel.setdefault(key.kernel_release, []).append(key)
            elif self._qemu is not None and (
                key.qemu_path != self._qemu.path or key.qemu_ctime_ns != self._qemu.ctime_ns
            ):
                stale_qemu.append(key)
        for old_release, keys in by_kernel.items():
            count = self._forget(keys)
            new_release = self.config.kernel_release
            log.info("kernel %s -> %s: %d records invalidated", old_release, new_release, count)
            self._emit_invalidated("kernel", old_release, new_release, count)
        if stale_qemu and self._qemu is not None:
            old_versions = ",".join(sorted({key.qemu_version for key in stale_qemu}))
            count = self._forget(stale_qemu)
            version = self._qemu.version
            self._emit_invalidated("qemu", old_versions, version, count)

    # ---- discovery events -----------------------------------------------------------------

    def _apply_snapshot(self, snapshot: HostSnapshot) -> None:
        for device_id in [i for i in self._devices if i not in snapshot.devices]:
            self._remove_device(device_id)
        for device in snapshot.devices.values():
            self._add_device(device)

    def _handle(self, event: DiscoveryEvent) -> None:
        if isinstance(event, DeviceAdded):
            self._add_device(event.device)
        elif isinstance(event, DeviceRemoved):
            self._remove_device(event.device.device_id)
        elif isinstance(event, DriverChanged):
            self._driver_changed(event)
        elif isinstance(event, Resynchronised):
            self._apply_snapshot(event.snapshot)
        elif isinstance(event, ParentRegistered | ParentUnregistered):
            self._rekey_all()
        if isinstance(event, ParentRegistered | DriverChanged | Resynchronised):
            self._idle_types_wakeup.set()

    def _add_device(self, device: Device) -> None:
        existing = self._devices.get(device.device_id)
        if existing is not None and existing.device == device:
            return
        entry = _DeviceEntry(device=device, key=self._key_for(device))
        self._devices[device.device_id] = entry
        waiter = self._device_waiters.get(device.device_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._devices_dirty = True
        self._resolve(entry)
        view = self._view(entry)
        if existing is None:
            self._emit(lambda lis: lis.device_added(view))
            self._emit_status()
        else:
            self._emit(lambda lis: lis.device_changed(view))

    def _remove_device(self, device_id: str) -> None:
        if self._devices.pop(device_id, None) is None:
            return
        self._devices_dirty = True
        self._store_wakeup.set()
        self._emit(lambda lis: lis.device_removed(device_id))
        self._emit_status()

    def _driver_changed(self, event: DriverChanged) -> None:
        new_version = event.new.version if event.new else ""
        old_version = event.old.version if event.old else ""
        stale = [
            key
            for key in self._records
            if key.driver == event.module and key.driver_version != new_version
        ]
        count = self._forget(stale)
        log.info(
            "driver %s changed %s -> %s: %d records invalidated",
            event.module,
            old_version or "(none)",
            new_version or "(none)",
            count,
        )
        self._emit_invalidated(event.module, old_version, new_version, count)
        self._rekey_all()

    def _rekey_all(self) -> None:
        for entry in list(self._devices.values()):
            key = self._key_for(entry.device)
            if key != entry.key or (key is not None and key not in self._records):
                entry.key = key
                before = (entry.state, entry.last_error)
                self._resolve(entry)
                if (entry.state, entry.last_error) != before or key is not None:
                    view = self._view(entry)
                    self._emit_changed(view)

    def _resolve(self, entry: _DeviceEntry) -> None:
        """Set a device's state from the cache, queueing a probe on a miss."""
        key = entry.key
        if key is None:
            entry.state = ProbeState.FAILED
            entry.last_error = (
                "no driver identity for this device"
                if self._driver_of(entry.device) is None
                else f"QEMU binary {self.config.qemu_binary} is not usable"
            )
            return
        record = self._records.get(key)
        if record is not None and record.outcome is ProbeOutcome.OK:
            entry.state, entry.last_error = ProbeState.DONE, ""
            return
        if record is not None and record.retry_at_us > self._clock_us():
            entry.state, entry.last_error = ProbeState.FAILED, record.error
            self._schedule_retry(key, record.retry_at_us)
            return
        job = self._jobs.get(key)
        entry.state = (
            ProbeState.PROBING if job and key in self._probing_keys else ProbeState.PENDING
        )
        entry.last_error = ""
        self._enqueue(key)

    # ---- probing --------------------------------------------------------------------------

    @property
    def _probing_keys(self) -> set[CapabilityKey]:
        return {key for key, job in self._jobs.items() if job.tried}

    def _waiting(self, key: CapabilityKey) -> list[_DeviceEntry]:
        return [entry for entry in self._devices.values() if entry.key == key]

    def _enqueue(
        self, key: CapabilityKey, urgent: bool = False
    ) -> asyncio.Future[CapabilityRecord]:
        job = self._jobs.get(key)
        if job is None:
            future: asyncio.Future[CapabilityRecord] = asyncio.get_running_loop().create_future()
            job = _ProbeJob(key=key, future=future)
            self._jobs[key] = job
            priority = -1_000_000 if urgent else -len(self._waiting(key))
            self._queue.put_nowait((priority, next(self._sequence), key))
        return job.future

    def _schedule_retry(self, key: CapabilityKey, at_us: int) -> None:
        if key in self._retry_timers:
            return
        delay = max(0.0, (at_us - self._clock_us()) / 1e6)
        loop = asyncio.get_running_loop()
        self._retry_timers[key] = loop.call_later(delay, self._retry_due, key)

    def _retry_due(self, key: CapabilityKey) -> None:
        self._retry_timers.pop(key, None)
        if self._waiting(key):
            self._enqueue(key)

    async def _probe_worker(self) -> None:
        while True:
            _, _, key = await self._queue.get()
            job = self._jobs.get(key)
            if job is None or job.future.done():
                continue
            try:
                record = await self._run_job(job)
            except asyncio.CancelledError:
                if not job.future.done():
                    job.future.cancel()
                self._jobs.pop(key, None)
                raise
            except Exception as err:
                log.exception("probe of %s failed unexpectedly", key.describe())
                record = self._failure(key, ProbeOutcome.FAILED, f"internal error: {err}")
                self._remember(record)
            self._jobs.pop(key, None)
            if not job.future.done():
                job.future.set_result(record)

    async def _run_job(self, job: _ProbeJob) -> CapabilityRecord:
        key = job.key
        while True:
            candidates = [e for e in self._waiting(key) if e.device.device_id not in job.tried]
            ready = [e for e in candidates if e.device.iommu_group]
            if candidates and not ready:
                return self._not_ready_record(key, candidates)
            if not ready:
                return self._busy_record(key)
            entry = ready[0]
            job.tried.add(entry.device.device_id)
            for waiting in self._waiting(key):
                self._set_state(waiting, ProbeState.PROBING, "")
            report = await self._probe(entry.device)
            if report.outcome is ProbeOutcome.BUSY:
                self._set_state(entry, ProbeState.BUSY, report.error or "device is in use")
                continue
            if (
                report.outcome is not ProbeOutcome.OK
                and self._devices.get(entry.device.device_id) is not entry
            ):
                # The device went away while it was probed: its failure says nothing about
                # the type. Try the instances still waiting (a re-created one included).
                log.info(
                    "%s went away during its probe; its failure is not cached",
                    entry.device.device_id,
                )
                job.tried.discard(entry.device.device_id)
                continue
            record = self._record_from(key, report)
            self._remember(record)
            self._history.append(
                ProbeHistoryEntry(
                    at_us=self._clock_us(),
                    key=key,
                    outcome=report.outcome,
                    duration=report.duration,
                    launches=len(report.launches),
                    error=report.error,
                )
            )
            self._store_wakeup.set()
            self._settle(key, record)
            return record

    def _not_ready_record(
        self, key: CapabilityKey, entries: list[_DeviceEntry]
    ) -> CapabilityRecord:
        """The devices have no IOMMU group yet (an mdev gets it when its driver binds): probe
        when they are updated, cache nothing."""
        error = "waiting for the device's IOMMU group"
        for entry in entries:
            self._set_state(entry, ProbeState.PENDING, error)
        return CapabilityRecord(key, ProbeOutcome.FAILED, None, error, 0, 0, 0)

    def _busy_record(self, key: CapabilityKey) -> CapabilityRecord:
        """Every instance of *key* is held by someone: retry later, cache nothing."""
        at = self._clock_us() + int(self.config.probe_retry_seconds * 1e6)
        for entry in self._waiting(key):
            self._set_state(entry, ProbeState.BUSY, "device is in use; will retry")
        self._schedule_retry(key, at)
        return CapabilityRecord(key, ProbeOutcome.BUSY, None, "device is in use", 0, at, 0)

    async def _probe(self, device: Device) -> ProbeReport:
        parent = self._source.snapshot.parents.get(device.parent)
        self._running_probes += 1
        self._emit_status()
        try:
            report = await self._runner.probe(device, parent)
        finally:
            self._running_probes -= 1
        self._probes_launched += 1
        log.info(
            "probed %s: %s in %.2fs (%d launches)%s",
            device.device_id,
            report.outcome.value,
            report.duration,
            len(report.launches),
            f": {report.error}" if report.error else "",
        )
        self._emit_status()
        return report

    def _record_from(self, key: CapabilityKey, report: ProbeReport) -> CapabilityRecord:
        if report.outcome is ProbeOutcome.OK and report.capabilities is not None:
            return CapabilityRecord(key, ProbeOutcome.OK, report.capabilities, "", self._clock_us())
        return self._failure(key, report.outcome, report.error or report.outcome.value)

    def _failure(self, key: CapabilityKey, outcome: ProbeOutcome, error: str) -> CapabilityRecord:
        previous = self._records.get(key)
        failures = (previous.failures if previous else 0) + 1
        first = self.config.probe_retry_seconds
        backoff = min(max(first, FAILURE_BACKOFF_MAX), first * 2 ** (failures - 1))
        now = self._clock_us()
        return CapabilityRecord(key, outcome, None, error, now, now + int(backoff * 1e6), failures)

    def _settle(self, key: CapabilityKey, record: CapabilityRecord) -> None:
        ok = record.outcome is ProbeOutcome.OK
        for entry in self._waiting(key):
            if ok:
                self._set_state(entry, ProbeState.DONE, "")
            else:
                self._set_state(entry, ProbeState.FAILED, record.error)
        if not ok:
            self._schedule_retry(key, record.retry_at_us)

    def _set_state(self, entry: _DeviceEntry, state: ProbeState, error: str) -> None:
        entry.state, entry.last_error = state, error
        self._emit_changed(self._view(entry))

    def _emit_changed(self, view: DeviceView) -> None:
        self._emit(lambda lis: lis.device_changed(view))

    def _emit_invalidated(self, driver: str, old: str, new: str, count: int) -> None:
        self._emit(lambda lis: lis.cache_invalidated(driver, old, new, count))

    def _emit_status(self) -> None:
        if self._status_deferred:
            self._status_pending = True
            return
        status = self.status
        self._emit(lambda lis: lis.status_changed(status))

    @contextlib.contextmanager
    def _one_status_update(self) -> Iterator[None]:
        """Within this block, status changes are told once at the end (a batch of events)."""
        if self._status_deferred:
            yield
            return
        self._status_deferred, self._status_pending = True, False
        try:
            yield
        finally:
            self._status_deferred = False
            if self._status_pending:
                self._emit_status()

    # ---- requests -------------------------------------------------------------------------

    async def refresh(self, device_id: str) -> DeviceView:
        """Drop the device's cached record, probe anew and return the fresh view.

        Raises:
            NotFoundError: no such device.
            ProbeBusyError: the device is in use and no other instance could be probed.
            ProbeTimeoutError: QEMU did not answer in time.
            ProbeError: the probe failed for another reason.
        """
        entry = self._live_entry(device_id)
        await self._check_qemu()
        entry.key = self._key_for(entry.device)
        if entry.key is None:
            self._resolve(entry)
            raise ProbeError(entry.last_error)
        key = entry.key
        if key not in self._jobs:
            self._forget([key])
            timer = self._retry_timers.pop(key, None)
            if timer is not None:
                timer.cancel()
        record = await asyncio.shield(self._enqueue(key, urgent=True))
        if record.outcome is ProbeOutcome.BUSY:
            raise ProbeBusyError(f"{device_id} is in use and was not disturbed")
        if record.outcome is ProbeOutcome.TIMEOUT:
            raise ProbeTimeoutError(record.error)
        if record.outcome is not ProbeOutcome.OK:
            raise ProbeError(record.error)
        return self.view(device_id)

    def invalidate(self, driver: str) -> int:
        """Drop every record of *driver* and re-probe its live devices; return the count."""
        stale = [key for key in self._records if key.driver == driver]
        old_versions = ",".join(sorted({key.driver_version for key in stale}))
        count = self._forget(stale)
        current = sorted(
            {
                ident.version
                for entry in self._devices.values()
                if (ident := self._driver_of(entry.device)) is not None and ident.module == driver
            }
        )
        new_version = ",".join(current)
        self._emit_invalidated(driver, old_versions, new_version, count)
        self._rekey_all()
        return count

    async def settled(self, device_id: str, wait_seconds: float) -> DeviceView:
        """The device's view once no probe for it is pending or running, or after *wait_seconds*.

        Raises:
            NotFoundError: no such device (also when it disappears while waiting).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            entry = self._live_entry(device_id)
            job = self._jobs.get(entry.key) if entry.key else None
            remaining = deadline - loop.time()
            if job is None or job.future.done() or remaining <= 0:
                return self._view(entry)
            try:
                await asyncio.wait_for(asyncio.shield(job.future), remaining)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                if job.future.cancelled() and not _current_task_cancelling():
                    continue
                raise

    async def probe_type(self, parent_name: str, type_id: str) -> TypeView:
        """Learn a type's capabilities by probing a temporary instance of it, then removing it.

        A type already known from the cache is answered without creating anything.

        Raises:
            NotFoundError: no such parent or type.
            ProbeError: no instance can be created, or the probe gave no answer.
            ProbeTimeoutError: the instance did not appear or the probe did not finish in time.
        """
        snapshot = self._source.snapshot
        parent = snapshot.parents.get(parent_name)
        mdev_type = snapshot.types.get((parent_name, type_id))
        if parent is None or mdev_type is None:
            raise NotFoundError(f"no mdev type {type_id!r} on parent {parent_name!r}")
        if self._type_capabilities(parent, mdev_type) is None:
            await self._probe_with_temporary_instance(parent, mdev_type)
        for view in self.types():
            if (view.parent, view.type_id) == (parent_name, type_id):
                return view
        raise NotFoundError(f"mdev type {type_id!r} on {parent_name!r} disappeared")

    async def _probe_with_temporary_instance(self, parent: Parent, mdev_type: MdevType) -> None:
        if mdev_type.available_instances <= 0:
            raise ProbeError(f"{mdev_type.type_id} on {parent.name} has no instance available")
        ident = (parent.name, mdev_type.type_id)
        if ident in self._type_probes:
            raise ProbeError(f"{mdev_type.type_id} on {parent.name} is being probed already")
        self._type_probes.add(ident)
        try:
            try:
                device_id = self._source.create_instance(parent, mdev_type.type_id)
            except DiscoveryError as err:
                raise ProbeError(f"cannot create an instance to probe: {err}") from err
            waiter = asyncio.get_running_loop().create_future()
            self._device_waiters[device_id] = waiter
            try:
                if device_id not in self._devices:
                    try:
                        await asyncio.wait_for(asyncio.shield(waiter), INSTANCE_APPEAR_SECONDS)
                    except TimeoutError as err:
                        raise ProbeTimeoutError(
                            f"the temporary instance {device_id} did not appear"
                        ) from err
                view = await self.settled(device_id, self.config.probe_timeout * 3)
            finally:
                del self._device_waiters[device_id]
                self._remove_temporary(parent, mdev_type, device_id)
        finally:
            self._type_probes.discard(ident)
        if view.state is ProbeState.FAILED:
            raise ProbeError(view.last_error or "the probe failed")

    def _remove_temporary(self, parent: Parent, mdev_type: MdevType, device_id: str) -> None:
        entry = self._devices.get(device_id)
        device = entry.device if entry else None
        if device is None:
            device = Device(
                kind=DeviceKind.MDEV,
                device_id=device_id,
                sysfs_path=str(parent.sysfs_path / device_id),
                parent=parent.name,
                type_id=mdev_type.type_id,
            )
        try:
            self._source.remove_instance(device)
        except DiscoveryError as err:
            log.error("cannot remove the temporary instance %s: %s", device_id, err)

    def _idle_types(self) -> list[tuple[Parent, MdevType]]:
        """Types with room for an instance, no live instance, and nothing cached."""
        snapshot = self._source.snapshot
        live = {(entry.device.parent, entry.device.type_id) for entry in self._devices.values()}
        idle = []
        for (parent_name, type_id), mdev_type in sorted(snapshot.types.items()):
            parent = snapshot.parents.get(parent_name)
            if parent is None or parent.driver is None or self._qemu is None:
                continue
            if (parent_name, type_id) in live or mdev_type.available_instances <= 0:
                continue
            record = self._records.get(self._make_key(parent.driver, parent.pci_id, type_id))
            if record is not None and (
                record.outcome is ProbeOutcome.OK or record.retry_at_us > self._clock_us()
            ):
                continue
            idle.append((parent, mdev_type))
        return idle

    async def _idle_type_prober(self) -> None:
        """Probe, one at a time, every type nobody has instantiated (opt-in)."""
        while True:
            await self._idle_types_wakeup.wait()
            self._idle_types_wakeup.clear()
            for parent, mdev_type in self._idle_types():
                try:
                    await self._probe_with_temporary_instance(parent, mdev_type)
                except (ProbeError, NotFoundError) as err:
                    log.warning("probing type %s on %s: %s", mdev_type.type_id, parent.name, err)

    def record_for(self, device_id: str) -> CapabilityRecord | None:
        """The cache record behind a device, if any (for diagnostics)."""
        entry = self._devices.get(device_id)
        return self._records.get(entry.key) if entry and entry.key else None


__all__ = [
    "DeviceSource",
    "DeviceView",
    "Engine",
    "EngineListener",
    "EngineStatus",
    "ProbeRunner",
    "ProbeState",
    "TypeView",
]
