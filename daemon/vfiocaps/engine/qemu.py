"""The QEMU binary's identity, re-read when the file changes; the one place the engine keeps it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ..errors import ProbeError
from ..qemubinary import QemuBinary
from .cache import RecordCache
from .views import ProbeRunner

log = logging.getLogger(__name__)
T = TypeVar("T")


class QemuWatcher:
    """The one owner of the QEMU binary's identity (:class:`QemuBinary`): the engine keys its
    cache on it and hands it to each probe, so nothing else asks the binary who it is.

    A change of the file (its ctime or size) costs one short QEMU start (``-version``) unless
    the store remembers that file: a warm start launches no QEMU. The ``vfio-pci`` properties,
    which only shape probes, are asked by the first probe that needs them (:meth:`for_probe`)
    and stored then. *changed* is called with the old and new identity when a known binary
    changes, *identified* when the binary is first known. While it is not, ``error`` says why
    (e.g. no probe user) and it is looked at again after *retry* seconds instead of *interval*.
    """

    def __init__(
        self,
        binary: Path,
        runner: ProbeRunner,
        cache: RecordCache,
        *,
        changed: Callable[[QemuBinary, QemuBinary], object],
        identified: Callable[[], None],
        checked: Callable[[], None],
        interval: float = 30.0,
        retry: float = 30.0,
    ) -> None:
        self._binary = binary
        self._runner = runner
        self._cache = cache
        self._changed = changed
        self._identified = identified
        self._checked = checked
        self._interval = interval
        self._retry = min(interval, retry)
        self._stat: tuple[int, int] | None = None
        self._asking = asyncio.Lock()  # one question for the properties at a time
        self.identity: QemuBinary | None = None
        self.error = ""

    async def check(self, initial: bool = False) -> None:
        """Look at the binary again; tell a change, then that a check was made."""
        try:
            await self._check(initial)
        finally:
            self._checked()

    async def _check(self, initial: bool) -> None:
        path = self._binary
        try:
            st = os.stat(path)
        except OSError as err:
            if self.identity is not None or initial:
                log.warning("QEMU binary %s unusable: %s", path, err)
            self._stat = None
            return
        stat_key = (st.st_ctime_ns, st.st_size)
        if stat_key == self._stat and self.identity is not None:
            return
        found = await self._cache.qemu_binary(str(path), *stat_key)
        if found is None:
            try:
                found = await self._runner.read_qemu()
            except ProbeError as err:
                log.warning("cannot identify QEMU %s: %s", path, err)
                self.error = str(err)
                return
            if (found.path, found.ctime_ns, found.size) != (str(path), *stat_key):
                # read_qemu names the binary as configured; a file that changed while it was
                # read is read again at the next check
                log.info("QEMU %s changed while it was read", path)
                return
            await self._cache.remember_qemu_binary(found)
        old = self.identity
        self.identity = found
        self._stat = stat_key
        self.error = ""
        if old is None:
            self._identified()
        elif old != self.identity:
            log.info("QEMU changed: %s -> %s", old.version, found.version)
            self._changed(old, self.identity)

    async def for_probe(self) -> QemuBinary | None:
        """The identity a probe is handed, with the ``vfio-pci`` properties: asked (one short
        QEMU start, once probes are allowed) and stored when not known yet. An identity without
        them is handed when they cannot be asked now; the probe asks them itself then.
        Raises nothing but cancellation."""
        known = self.identity
        if known is None or known.vfio_pci_properties is not None:
            return known
        await self._runner.wait_allowed()  # not before the daemon serves
        async with self._asking:
            known = self.identity
            if known is None or known.vfio_pci_properties is not None:
                return known
            try:
                found = await self._runner.read_qemu_properties(known)
            except ProbeError as err:
                log.warning("cannot ask QEMU %s for its vfio-pci properties: %s", known.path, err)
                return known
            if self.identity is not known or (found.ctime_ns, found.size) != (
                known.ctime_ns,
                known.size,
            ):
                log.info("QEMU %s changed while its properties were read", known.path)
                return self.identity
            self.identity = found
            await self._cache.remember_qemu_binary(found)
            return found

    async def run(self) -> None:
        """Check the binary every *interval* seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval if self.identity else self._retry)
            await self.check()


async def identify_beside(cache: RecordCache, qemu: QemuWatcher, other: Awaitable[T]) -> T:
    """Await *other* while *cache* opens and *qemu* knows the binary (from the store, else
    asked: :meth:`QemuWatcher.check`); return what *other* returned once all is done. A store
    that does not exist yet cannot know the binary, so QEMU is asked while it is created.

    Raises what *other*, the cache or the check raised; the rest is cancelled then.
    """
    ready = asyncio.ensure_future(_open_and_identify(cache, qemu))
    try:
        await asyncio.sleep(0)  # QEMU starts first: reading the host may not yield for a while
        result = await other
    except BaseException:
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)
        raise
    await ready
    return result


async def _open_and_identify(cache: RecordCache, qemu: QemuWatcher) -> None:
    if cache.exists:
        await cache.open()
        await qemu.check(initial=True)
        return
    opened = asyncio.ensure_future(cache.open())
    try:
        await qemu.check(initial=True)
    except BaseException:
        opened.cancel()
        await asyncio.gather(opened, return_exceptions=True)
        raise
    await opened
    if qemu.identity is not None:  # asked before the store could keep it
        await cache.remember_qemu_binary(qemu.identity)
