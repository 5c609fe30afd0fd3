"""The records in memory, written behind to the store; every store error is handled here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..errors import StoreError
from ..qemubinary import QemuBinary
from ..store import (
    CapabilityKey,
    CapabilityRecord,
    CapabilityStore,
    KnownDevice,
    ProbeHistoryEntry,
    StoreCorruptError,
)
from .views import CacheState

log = logging.getLogger(__name__)


class RecordCache:
    """Serves records from memory and keeps the store following it.

    Writes are batched by one writer task; a failed write is kept for the next attempt, after
    *retry_seconds*. A corrupt database is moved aside and rebuilt from memory; while the store
    cannot be written, the state is :attr:`CacheState.DEGRADED` and nothing is lost from memory.
    """

    def __init__(
        self,
        store: CapabilityStore,
        *,
        known_devices: Callable[[], list[KnownDevice]],
        state_changed: Callable[[], None],
        retry_seconds: float = 5.0,
    ) -> None:
        self._store = store
        self._known_devices = known_devices
        self._state_changed = state_changed
        self._retry_seconds = retry_seconds
        self._records: dict[CapabilityKey, CapabilityRecord] = {}
        self._dirty: dict[CapabilityKey, CapabilityRecord | None] = {}
        self._history: list[ProbeHistoryEntry] = []
        self._devices_dirty = False
        self._wakeup = asyncio.Event()
        self._flushing: asyncio.Future[bool] | None = None
        self.state = CacheState.OK
        self.error = ""

    def get(self, key: CapabilityKey | None) -> CapabilityRecord | None:
        """The record of *key*, if any."""
        return self._records.get(key) if key is not None else None

    def keys(self) -> list[CapabilityKey]:
        """Every key with a record."""
        return list(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    async def open(self) -> None:
        """Open the store and load its records; a store that fails leaves the cache in memory."""
        try:
            await self._store.open()
            records = await self._store.load_records()
        except StoreError as err:
            self._set_state(CacheState.DEGRADED, str(err))
            log.error("cache unavailable, serving from memory: %s", err)
            return
        self._records = {record.key: record for record in records}
        log.info("cache %s: %d records", self._store.path, len(records))

    @property
    def exists(self) -> bool:
        """Whether the store's file exists (a new one knows no record and no QEMU binary)."""
        return self._store.path.exists()

    async def qemu_binary(self, path: str, ctime_ns: int, size: int) -> QemuBinary | None:
        """The QEMU binary the store remembers for this file, if any and readable."""
        if not self._store.is_open:
            return None
        try:
            return await self._store.qemu_binary(path, ctime_ns, size)
        except StoreError as err:
            log.debug("QEMU binary lookup failed: %s", err)
            return None

    async def remember_qemu_binary(self, binary: QemuBinary) -> None:
        """Keep a QEMU binary for the next start, if the store can."""
        if not self._store.is_open:
            return
        try:
            await self._store.remember_qemu_binary(binary)
        except StoreError as err:
            log.debug("cannot remember the QEMU binary: %s", err)

    def remember(self, record: CapabilityRecord, history: ProbeHistoryEntry | None = None) -> None:
        """Keep *record* (and the probe that made it) and write it behind."""
        self._records[record.key] = record
        self._dirty[record.key] = record
        if history is not None:
            self._history.append(history)
        self._wakeup.set()

    def forget(self, keys: Iterable[CapabilityKey]) -> int:
        """Drop the records of *keys*; return how many there were."""
        count = 0
        for key in list(keys):
            if self._records.pop(key, None) is not None:
                count += 1
            self._dirty[key] = None
        self._wakeup.set()
        return count

    def devices_changed(self, *, write_now: bool) -> None:
        """The live devices changed: the known-devices table is written with the next write,
        or now (*write_now*: a removal; an arrival alone waits, as thousands arrive at start)."""
        self._devices_dirty = True
        if write_now:
            self._wakeup.set()

    async def run_writer(self) -> None:
        """Write changes as they come until cancelled; a stop lets the write in flight finish."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._flushing = asyncio.ensure_future(self.flush())
            if not await asyncio.shield(self._flushing):
                await asyncio.sleep(self._retry_seconds)
                self._wakeup.set()

    async def close(self) -> None:
        """Finish the write in flight, write the rest once more, and close the store."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()
        await self._store.close()

    async def flush(self) -> bool:
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
                self._set_state(CacheState.DEGRADED, str(recover_err))
                return False
            self._dirty = {key: record for key, record in self._records.items()}
            self._devices_dirty = True
            return False
        except StoreError as err:
            self._devices_dirty = True
            self._set_state(CacheState.DEGRADED, str(err))
            log.warning("cache write failed, keeping changes in memory: %s", err)
            return False
        for key, record in dirty.items():
            if self._dirty.get(key, record) is record:
                self._dirty.pop(key, None)
        del self._history[: len(history)]
        self._set_state(CacheState.OK, "")
        return True

    def _set_state(self, state: CacheState, error: str) -> None:
        if (state, error) != (self.state, self.error):
            self.state, self.error = state, error
            self._state_changed()
