"""Following the host: discovery's snapshot and events applied to the table of live devices."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ..model import (
    Device,
    DeviceAdded,
    DeviceRemoved,
    DiscoveryEvent,
    DriverChanged,
    HostSnapshot,
    ParentRegistered,
    ParentUnregistered,
    Resynchronised,
)
from ..store import CapabilityKey
from . import keys
from .announcer import Announcer
from .cache import RecordCache
from .table import DeviceEntry, DeviceTable
from .temporary import NewInstances
from .typeprobe import TypeProber
from .views import DeviceSource, ProbeState

# The longest a Refresh waits for discovery to apply a profile change it has just seen.
RECHECK_SECONDS = 2.0


class HostFollower:
    """Turns what discovery reports into table entries, their states and their probe jobs.

    *key_for* gives a device's cache key, *resolve* a device's state from the cache,
    *invalidate* drops stale records (then every key is looked up again by *rekey_all*).
    """

    def __init__(
        self,
        source: DeviceSource,
        table: DeviceTable,
        cache: RecordCache,
        types: TypeProber,
        new_instances: NewInstances,
        tell: Announcer,
        *,
        key_for: Callable[[Device], CapabilityKey | None],
        resolve: Callable[[CapabilityKey | None, Device], tuple[ProbeState, str]],
        invalidate: Callable[[keys.Invalidation], int],
        rekey_all: Callable[[], None],
    ) -> None:
        self._source = source
        self._table = table
        self._cache = cache
        self._types = types
        self._new_instances = new_instances
        self._tell = tell
        self._key_for = key_for
        self._resolve = resolve
        self._invalidate = invalidate
        self._rekey_all = rekey_all
        self._batch_applied = asyncio.Event()

    async def follow(self) -> None:
        """Apply discovery's events, a batch at a time, until cancelled."""
        async for batch in self._source.events():
            with self._tell.batch():
                for event in batch:
                    self._handle(event)
            self._batch_applied.set()

    async def recheck_profiles(self) -> None:
        """Look for vGPU profiles set or cleared by other tools now (they send no uevent) and,
        if any changed, wait (bounded) until discovery's answer has been applied. Raises
        nothing."""
        self._batch_applied.clear()
        if not self._source.recheck_profiles():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECHECK_SECONDS):
                await self._batch_applied.wait()

    def apply_snapshot(self, snapshot: HostSnapshot) -> None:
        """Make the table equal to *snapshot*."""
        for device_id in [i for i in self._table.ids() if i not in snapshot.devices]:
            self._remove_device(device_id)
        for device in snapshot.devices.values():
            self._add_device(device)

    def _handle(self, event: DiscoveryEvent) -> None:
        if isinstance(event, DeviceAdded):
            self._add_device(event.device)
        elif isinstance(event, DeviceRemoved):
            self._remove_device(event.device.device_id)
        elif isinstance(event, DriverChanged):
            cached = self._cache.keys()
            self._invalidate(keys.driver_changed(cached, event.module, event.old, event.new))
        elif isinstance(event, Resynchronised):
            self.apply_snapshot(event.snapshot)
        elif isinstance(event, ParentRegistered | ParentUnregistered):
            self._rekey_all()
        if isinstance(event, ParentRegistered | DriverChanged | Resynchronised):
            self._types.wake()

    def _add_device(self, device: Device) -> None:
        existing = self._table.get(device.device_id)
        if existing is not None and existing.device == device:
            return
        entry = DeviceEntry(device=device, key=self._key_for(device))
        entry.state, entry.last_error = self._resolve(entry.key, device)
        self._table.put(entry)
        if entry.key is not None and entry.state in (ProbeState.PENDING, ProbeState.PROBING):
            self._new_instances.queue(entry, appeared=existing is None)
        self._types.device_appeared(device.device_id)
        self._cache.devices_changed(write_now=False)
        if existing is None:
            self._tell.status_changed()

    def _remove_device(self, device_id: str) -> None:
        if self._table.remove(device_id):
            self._cache.devices_changed(write_now=True)
            self._tell.status_changed()
