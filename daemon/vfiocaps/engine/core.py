"""The engine: wires its parts together, follows discovery's events and serves requests.

Devices live in a :class:`DeviceTable`, records in a :class:`RecordCache`, probes run in a
:class:`ProbeScheduler`, the QEMU binary is followed by a :class:`QemuWatcher`, types nobody
instantiated are probed by a :class:`TypeProber`, discovery's reports are applied by a
:class:`HostFollower`, and an :class:`Announcer` tells listeners. It knows nothing of D-Bus; the
daemon's run-state says when it has learned the host (see :mod:`vfiocaps.runstate`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..bootid import BOOT_ID_PATH
from ..capabilities import Capabilities, ProbeOutcome
from ..config import Config
from ..discovery.instances import InstanceLedger
from ..errors import NotFoundError, ProbeBusyError, ProbeError, ProbeTimeoutError
from ..model import Device, MdevType, Parent
from ..runstate import Lifecycle
from ..store import CapabilityKey, CapabilityStore, KnownDevice
from ..tasks import TaskSet
from . import keys
from .announcer import Announcer
from .cache import RecordCache
from .follow import HostFollower
from .holds import DomainHolds, ProbeGate
from .present import device_view, known_devices, type_views
from .qemu import QemuWatcher, identify_beside
from .scheduler import ProbeScheduler
from .table import DeviceEntry, DeviceTable
from .temporary import NewInstances
from .typeprobe import TypeProber
from .views import (
    DeviceSource,
    DeviceView,
    EngineListener,
    EngineStatus,
    ProbeRunner,
    ProbeState,
    Timings,
    TypeView,
)

log = logging.getLogger(__name__)


DEFAULT_TIMINGS = Timings()


def _now_us() -> int:
    return time.time_ns() // 1000


class Engine:
    """Owns the parts; turns discovery events and requests into their calls."""

    def __init__(
        self,
        config: Config,
        source: DeviceSource,
        runner: ProbeRunner,
        store: CapabilityStore,
        *,
        lifecycle: Lifecycle,
        clock_us: Callable[[], int] = _now_us,
        timings: Timings = DEFAULT_TIMINGS,
        boot_id_path: Path = BOOT_ID_PATH,
    ) -> None:
        self.config = config
        self._source = source
        self._clock_us = clock_us
        self._announcer = Announcer(lambda: self.status)
        tell = self._announcer
        self._table = DeviceTable(
            added=lambda entry: tell.added(self._view(entry)),
            changed=lambda entry: tell.changed(self._view(entry)),
            removed=tell.removed,
        )
        self._cache = RecordCache(
            store,
            known_devices=self._known_devices,
            state_changed=tell.status_changed,
            retry_seconds=timings.store_retry,
        )
        self._qemu = QemuWatcher(
            config.qemu_binary,
            runner,
            self._cache,
            changed=lambda old, new: self._invalidate(
                keys.qemu_changed(self._cache.keys(), old, new)
            ),
            identified=self._rekey_all,  # devices that waited for QEMU (or the probe user)
            checked=self._host_checked,
            interval=timings.qemu_check,
            retry=config.probe_retry_seconds,
        )
        self._gate = ProbeGate()
        self._scheduler = ProbeScheduler(
            self._table,
            self._cache,
            runner,
            parent_of=lambda device: self._source.snapshot.parents.get(device.parent),
            qemu_of=self._qemu.for_probe,
            clock_us=clock_us,
            retry_seconds=config.probe_retry_seconds,
            running_changed=tell.status_changed,
            blocked=self._gate.blocks,
        )
        # What domains (VMs) hold: the bus adaptor's HoldDevices and ReleaseDevices.
        self.holds = DomainHolds(self._table, self._gate, self._scheduler, self._resolve)
        self._types = TypeProber(
            source,
            InstanceLedger(
                config.runtime_dir / "temporary-instances", boot_id_path, dev_root=config.dev_root
            ),
            settled=self.settled,
            stop_probe=self._stop_probe,
            device=lambda device_id: e.device if (e := self._table.get(device_id)) else None,
            idle_types=self._idle_types,
            allowed=runner.wait_allowed,
            probe_seconds=config.probe_timeout * 3,
            appear_seconds=timings.instance_appear,
            write_seconds=timings.sysfs_write,
        )
        self._tasks = TaskSet()
        self._new_instances = NewInstances(
            config,
            self._gate,
            self._scheduler,
            self._types,
            self._tasks,
            learned=lambda: lifecycle.serving,
            snapshot=lambda: self._source.snapshot,
            resolve=self._resolve,
            entry=self._table.get,
        )
        self._follower = HostFollower(
            source,
            self._table,
            self._cache,
            self._types,
            self._new_instances,
            tell,
            key_for=self._key_for,
            resolve=self._resolve,
            invalidate=self._invalidate,
            rekey_all=self._rekey_all,
        )
        self._kvm_available = False

    def subscribe(self, listener: EngineListener) -> None:
        """Receive every change from now on."""
        self._announcer.subscribe(listener)

    def unsubscribe(self, listener: EngineListener) -> None:
        """Stop receiving changes. Idempotent."""
        self._announcer.unsubscribe(listener)

    @property
    def status(self) -> EngineStatus:
        """Daemon-wide state."""
        return EngineStatus(
            qemu=self._qemu.identity,
            kernel_release=self.config.kernel_release,
            kvm_available=self._kvm_available,
            probing=self._scheduler.running > 0,
            device_count=len(self._table),
            probes_launched=self._scheduler.launched,
            cache_state=self._cache.state,
            cache_error=self._cache.error,
        )

    def device_ids(self) -> list[str]:
        """Ids of the live devices, sorted."""
        return self._table.ids()

    def view(self, device_id: str) -> DeviceView:
        """The current view of one device.

        Raises:
            NotFoundError: no live device has this id.
        """
        return self._view(self._table.live(device_id))

    def probe_state(self, device_id: str) -> ProbeState:
        """Where a live device stands, without building its view.

        Raises:
            NotFoundError: no live device has this id.
        """
        return self._table.live(device_id).state

    def views(self) -> list[DeviceView]:
        """Views of every live device, sorted by id."""
        return [self.view(device_id) for device_id in self._table.ids()]

    def find(self, *, device_id: str | None = None, sysfs_path: str | None = None) -> DeviceView:
        """Find a live device by id or by its resolved sysfs path.

        Raises:
            NotFoundError: nothing matches.
        """
        if device_id is not None:
            return self.view(device_id)
        return self._view(self._table.at_path(sysfs_path))

    def types(self) -> list[TypeView]:
        """Every mdev type of every registered parent, plus the types of live PCI devices."""
        host = self._source.snapshot
        return type_views(host, self._table, self._cache.get, self._type_capabilities)

    def _view(self, entry: DeviceEntry) -> DeviceView:
        return device_view(entry, self._cache.get(entry.key), self._source.snapshot)

    def _type_capabilities(self, parent: Parent | None, mdev_type: MdevType) -> Capabilities | None:
        qemu = self._qemu.identity
        if parent is None or parent.driver is None or qemu is None:
            return None
        kernel = self.config.kernel_release
        type_id = keys.type_identity(mdev_type)
        key = keys.make_key(parent.driver, parent.pci_id, type_id, kernel, qemu)
        record = self._cache.get(key)
        return record.capabilities if record else None

    def _key_for(self, device: Device) -> CapabilityKey | None:
        snapshot, kernel = self._source.snapshot, self.config.kernel_release
        return keys.key_for(device, snapshot, kernel, self._qemu.identity)

    async def run(self, serve: Callable[[], Awaitable[None]]) -> None:
        """Open the cache, learn the host, await *serve* (which makes the daemon serve: the
        learned moment), then follow the host's changes until cancelled. Discovery's events
        wait meanwhile, so no device comes or goes while the daemon starts to serve.

        Raises:
            asyncio.CancelledError: when stopped; everything started here is stopped first.
            Exception: what *serve* raises, after everything started here is stopped.
        """
        kernel = self.config.kernel_release
        try:
            await self._types.remove_leftovers(self.config.sysfs_root)
            # The host is read while the cache opens and QEMU is asked (one short start at most).
            snapshot = await identify_beside(self._cache, self._qemu, self._source.start())
            for stale in keys.at_start(self._cache.keys(), kernel, self._qemu.identity):
                self._invalidate(stale)
            for _ in range(self.config.probe_concurrency):
                self._tasks.spawn(self._scheduler.run_worker())
            self._tasks.spawn(self._cache.run_writer())
            self._tasks.spawn(self._qemu.run())
            with self._announcer.batch():
                self._follower.apply_snapshot(snapshot)
            if self.config.probe_types_without_instances:
                self._tasks.spawn(self._types.run_idle())
            await serve()
            self._announcer.status_changed()
            await self._follower.follow()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        await self._tasks.stop()
        await self._types.close()  # late sysfs writes keep their records for the next start
        self._scheduler.stop()
        await self._cache.close()
        await self._source.close()

    def _host_checked(self) -> None:
        """With the QEMU binary, look at /dev/kvm (not at every status: that is told often)."""
        self._kvm_available = os.access(self.config.dev_root / "kvm", os.R_OK | os.W_OK)
        self._announcer.status_changed()

    def _known_devices(self) -> list[KnownDevice]:
        return known_devices(self._table, self._source.snapshot, self._clock_us())

    def _invalidate(self, invalidation: keys.Invalidation) -> int:
        """Drop the stale records, tell why, and look up every device's key again."""
        count = self._cache.forget(invalidation.stale)
        old, new = invalidation.old or "(none)", invalidation.new or "(none)"
        log.info("%s %s -> %s: %d records invalidated", invalidation.driver, old, new, count)
        self._announcer.invalidated(invalidation.driver, invalidation.old, invalidation.new, count)
        self._rekey_all()
        return count

    def _rekey_all(self) -> None:
        for entry in self._table:
            key = self._key_for(entry.device)
            if key != entry.key or (key is not None and key not in self._cache):
                entry.key = key
                before = (entry.state, entry.last_error)
                state, error = self._resolve(key, entry.device)
                if (state, error) != before or key is not None:
                    self._table.set_state(entry, state, error)
                if key is not None and state in (ProbeState.PENDING, ProbeState.PROBING):
                    self._scheduler.enqueue(key)

    def _resolve(self, key: CapabilityKey | None, device: Device) -> tuple[ProbeState, str]:
        """A device's state from the cache; a failure not yet due schedules its retry."""
        if key is None:
            if keys.driver_of(device, self._source.snapshot) is None:
                return ProbeState.FAILED, "no driver identity for this device"
            reason = self._qemu.error or f"QEMU binary {self.config.qemu_binary} is not usable"
            return ProbeState.FAILED, reason
        return self._scheduler.state_of(key)

    async def recheck_profiles(self) -> None:
        """See :meth:`HostFollower.recheck_profiles`. Raises nothing."""
        await self._follower.recheck_profiles()

    async def refresh(self, device_id: str) -> DeviceView:
        """Drop the device's cached record, probe anew and return the fresh view.

        Raises:
            NotFoundError: no such device.
            ProbeBusyError: the device is in use and no other instance could be probed.
            ProbeTimeoutError: QEMU did not answer in time.
            ProbeError: the probe failed for another reason.
        """
        entry = self._table.live(device_id)
        await self._qemu.check()
        key = entry.key = self._key_for(entry.device)
        if key is None:
            state, error = self._resolve(None, entry.device)
            self._table.set_state(entry, state, error)
            raise ProbeError(error)
        if self._scheduler.job(key) is None:
            self._cache.forget([key])
            self._scheduler.cancel_retry(key)
        record = await asyncio.shield(self._scheduler.enqueue(key, urgent=True))
        if record.outcome is ProbeOutcome.BUSY:
            raise ProbeBusyError(f"{device_id} is in use and was not disturbed")
        if record.outcome is ProbeOutcome.TIMEOUT:
            raise ProbeTimeoutError(record.error)
        if record.outcome is not ProbeOutcome.OK:
            raise ProbeError(record.error)
        return self.view(device_id)

    def invalidate(self, driver: str) -> int:
        """Drop every record of *driver* and re-probe its live devices; return the count."""
        loaded = (keys.driver_of(entry.device, self._source.snapshot) for entry in self._table)
        live = [i.version for i in loaded if i is not None and i.module == driver]
        return self._invalidate(keys.driver_invalidated(self._cache.keys(), driver, live))

    async def settled(self, device_id: str, wait_seconds: float) -> DeviceView:
        """The device's view once no probe for it is pending or running, or after *wait_seconds*.

        Every caller waits on the one future of the device's probe job; a call holds no task.

        Raises:
            NotFoundError: no such device (also when it disappears while waiting).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            entry = self._table.live(device_id)
            job = self._scheduler.job(entry.key)
            remaining = deadline - loop.time()
            if job is None or job.done() or remaining <= 0:
                return self._view(entry)
            await asyncio.wait((job,), timeout=remaining)

    async def probe_type(self, parent_name: str, type_id: str) -> TypeView:
        """Learn a type's capabilities by probing a temporary instance of it, then removing it.

        A type already known from the cache is answered without creating anything.

        Raises:
            NotFoundError: no such parent or type.
            ProbeError: no instance can be created, or the probe gave no answer.
            ProbeTimeoutError: the instance did not appear or the probe did not finish in time.
        """
        await self._types.probe_unless_known(parent_name, type_id, self._type_capabilities)
        for view in self.types():
            if (view.parent, view.type_id) == (parent_name, type_id):
                return view
        raise NotFoundError(f"mdev type {type_id!r} on {parent_name!r} disappeared")

    async def _stop_probe(self, device_id: str) -> None:
        entry = self._table.get(device_id)
        if entry is not None and entry.key is not None:
            await self._scheduler.cancel(entry.key, f"{device_id} is being removed")

    def _idle_types(self) -> list[tuple[Parent, MdevType]]:
        """Types with room for an instance, no live instance, and nothing cached."""
        live = {(entry.device.parent, entry.device.type_id) for entry in self._table}
        snapshot, kernel, qemu = (
            self._source.snapshot,
            self.config.kernel_release,
            self._qemu.identity,
        )
        return keys.idle_types(snapshot, live, kernel, qemu, self._cache.get, self._clock_us())
