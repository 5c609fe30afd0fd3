"""Probing a type nobody instantiated: a temporary instance, created, probed and removed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ..capabilities import Capabilities
from ..discovery.instances import InstanceLedger, new_instance_uuid
from ..errors import (
    DiscoveryError,
    NeedsGpuInstanceError,
    NotFoundError,
    ProbeError,
    ProbeTimeoutError,
    ProfileRefusedError,
)
from ..model import NEEDS_GPU_INSTANCE, Device, DeviceKind, MdevType, Parent, TypeKind
from ..tasks import TaskSet
from .views import DeviceSource, DeviceView, ProbeState

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a sysfs write that missed its deadline is still waited for in the background (its
# record is kept meanwhile, and past this, for the next start).
LATE_WRITE_SECONDS = 300.0


class TypeProber:
    """Creates an instance of a type, waits until its probe has ended, and removes it.

    The sysfs writes run in a thread with a deadline: the kernel holds a removal until QEMU lets
    the device go, so a probe still running is stopped (and its QEMU reaped) first. Every
    instance is recorded in *ledger* before it is created (its UUID is chosen here) and until
    it is seen gone after the last write's thread returned: a write that misses its deadline
    is not taken as not done, its thread is waited for in the background (at most
    :data:`LATE_WRITE_SECONDS`) and the instance removed then; a crash leaves the record for
    the next start.
    """

    def __init__(
        self,
        source: DeviceSource,
        ledger: InstanceLedger,
        *,
        settled: Callable[[str, float], Awaitable[DeviceView]],
        stop_probe: Callable[[str], Awaitable[None]],
        device: Callable[[str], Device | None],
        idle_types: Callable[[], list[tuple[Parent, MdevType]]],
        allowed: Callable[[], Awaitable[None]],
        probe_seconds: float,
        appear_seconds: float = 10.0,
        write_seconds: float = 10.0,
        late_seconds: float = LATE_WRITE_SECONDS,
    ) -> None:
        self._source = source
        self._ledger = ledger
        self._settled = settled
        self._stop_probe = stop_probe
        self._device = device
        self._idle_types = idle_types
        self._allowed = allowed
        self._probe_seconds = probe_seconds
        self._appear_seconds = appear_seconds
        self._write_seconds = write_seconds
        self._late_seconds = late_seconds
        self._late = TaskSet("late sysfs write")
        self._probing: set[tuple[str, str]] = set()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._wakeup = asyncio.Event()

    def device_appeared(self, device_id: str) -> None:
        """Discovery saw *device_id*: a temporary instance may have appeared."""
        waiter = self._waiters.get(device_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_temporary(self, device: Device) -> bool:
        """Whether *device* is (or may be: discovery can see it before its creation returned)
        an instance created here to be probed."""
        return device.device_id in self._waiters or (device.parent, device.type_id) in self._probing

    def wake(self) -> None:
        """The host changed: look for idle types again."""
        self._wakeup.set()

    async def _off_loop(
        self,
        what: str,
        call: Callable[..., T],
        *args: object,
        late: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """Run a sysfs write in a thread, waiting at most *write_seconds*. When it misses that
        deadline (or the caller is cancelled), *late* is run once the thread has returned.

        Raises:
            ProbeTimeoutError: the kernel did not answer in time (the thread is left to finish).
        """
        work = asyncio.ensure_future(asyncio.to_thread(call, *args))
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that arrives
        # together with the thread's result, and the task would go on after a stop.
        try:
            async with asyncio.timeout(self._write_seconds):
                return await asyncio.shield(work)
        except TimeoutError as err:
            self._follow(what, work, late)
            raise ProbeTimeoutError(f"{what} took over {self._write_seconds:g} s") from err
        except asyncio.CancelledError:
            self._follow(what, work, late)
            raise

    def _follow(
        self, what: str, work: asyncio.Future[T], late: Callable[[], Awaitable[None]] | None
    ) -> None:
        """After *work* (a write's thread) returns, at most *late_seconds* from now, run *late*."""
        if late is None:
            return

        async def follow() -> None:
            try:
                async with asyncio.timeout(self._late_seconds):
                    await asyncio.gather(work, return_exceptions=True)
            except TimeoutError:
                log.error(
                    "%s has not returned after %g s more; its record is kept for the next start",
                    what,
                    self._late_seconds,
                )
                return
            await late()

        self._late.spawn(follow(), name=f"vfiocaps-late-{what}")

    async def close(self) -> None:
        """Stop waiting for late writes (their records stay for the next start)."""
        await self._late.stop()

    async def remove_leftovers(self, sysfs_root: Path) -> None:
        """Remove the instances an earlier daemon of this boot created and did not remove."""
        try:
            await self._off_loop(
                "removing leftover instances", self._ledger.remove_leftovers, sysfs_root
            )
        except ProbeTimeoutError as err:
            log.error("%s", err)

    async def probe_unless_known(
        self,
        parent_name: str,
        type_id: str,
        known: Callable[[Parent, MdevType], Capabilities | None],
    ) -> None:
        """Probe a type of the host through a temporary instance, unless *known* answers it.

        Raises:
            NotFoundError: no such parent or type.
            ProbeError, ProbeTimeoutError, NeedsGpuInstanceError, ProfileRefusedError: as
                :meth:`probe`.
        """
        snapshot = self._source.snapshot
        parent = snapshot.parents.get(parent_name)
        mdev_type = snapshot.types.get((parent_name, type_id))
        if parent is None or mdev_type is None:
            raise NotFoundError(f"no mdev type {type_id!r} on parent {parent_name!r}")
        if known(parent, mdev_type) is None:
            await self.probe(parent, mdev_type)

    async def probe(self, parent: Parent, mdev_type: MdevType) -> None:
        """Probe *mdev_type* on *parent* through a temporary instance.

        Raises:
            NeedsGpuInstanceError: a MIG-backed profile; nothing is set.
            ProfileRefusedError: the vendor driver refused the profile (named by its errno).
            ProbeError: no instance can be created or recorded, or the probe gave no answer.
            ProbeTimeoutError: the instance did not appear, the kernel did not answer, or the
                probe did not end in time (it is stopped before the instance is removed).
        """
        if mdev_type.requires == NEEDS_GPU_INSTANCE:
            raise NeedsGpuInstanceError(
                f"profile {mdev_type.type_id} ({mdev_type.name}) on {parent.name} is MIG-backed:"
                " it needs MIG mode and a GPU instance first (nvidia-smi mig -cgi), which"
                " vfiocapsd does not make; set it on a VF yourself and the VF is probed"
            )
        if mdev_type.available_instances <= 0:
            raise ProbeError(
                f"{mdev_type.type_id} on {parent.name} has no instance available"
                + (
                    " (the card has no room for it now)"
                    if mdev_type.kind is TypeKind.VF_PROFILE
                    else ""
                )
            )
        ident = (parent.name, mdev_type.type_id)
        if ident in self._probing:
            raise ProbeError(f"{mdev_type.type_id} on {parent.name} is being probed already")
        self._probing.add(ident)
        try:
            view = await self._probe_new_instance(parent, mdev_type)
        finally:
            self._probing.discard(ident)
        if view.state is ProbeState.FAILED:
            raise ProbeError(view.last_error or "the probe failed")
        if view.state in (ProbeState.PENDING, ProbeState.PROBING):
            raise ProbeTimeoutError(
                f"the probe of {view.device.device_id} did not end within"
                f" {self._probe_seconds:g} s and was stopped"
            )

    async def _probe_new_instance(self, parent: Parent, mdev_type: MdevType) -> DeviceView:
        recorded = mdev_type.kind is TypeKind.MDEV  # a VF's profile is recorded by discovery
        uuid = new_instance_uuid() if recorded else ""
        if recorded:
            try:
                self._ledger.record(uuid, parent.name, mdev_type.type_id)
            except DiscoveryError as err:
                raise ProbeError(f"not creating an instance without a record: {err}") from err
        try:
            device_id = await self._off_loop(
                f"creating an instance of {mdev_type.type_id}",
                self._source.create_instance,
                parent,
                mdev_type.type_id,
                uuid,
                late=lambda: self._remove(parent, mdev_type, uuid) if recorded else _nothing(),
            )
        except ProfileRefusedError:
            raise  # named by the driver's errno
        except DiscoveryError as err:
            # The write returned: the kernel refused. Whatever it left is removed.
            if recorded:
                await self._remove(parent, mdev_type, uuid)
            raise ProbeError(f"cannot create an instance to probe: {err}") from err
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[device_id] = waiter
        try:
            if self._device(device_id) is None:
                try:
                    async with asyncio.timeout(self._appear_seconds):
                        await asyncio.shield(waiter)
                except TimeoutError as err:
                    raise ProbeTimeoutError(
                        f"the temporary instance {device_id} did not appear"
                    ) from err
            return await self._settled(device_id, self._probe_seconds)
        finally:
            del self._waiters[device_id]
            await self._remove(parent, mdev_type, device_id)

    async def _remove(self, parent: Parent, mdev_type: MdevType, device_id: str) -> None:
        """Stop the instance's probe if it still runs, then remove it; its record goes once it
        is seen gone after the removal's thread returned. Raises nothing."""
        await self._stop_probe(device_id)
        recorded = mdev_type.kind is TypeKind.MDEV
        if recorded and not self._source.instance_exists(device_id):
            self._ledger.forget(device_id)
            return
        device = self._device(device_id) or Device(
            kind=DeviceKind.MDEV,
            device_id=device_id,
            sysfs_path=str(parent.sysfs_path / device_id),
            parent=parent.name,
            type_id=mdev_type.type_id,
        )

        async def settle() -> None:
            if recorded and not self._source.instance_exists(device_id):
                self._ledger.forget(device_id)

        try:
            await self._off_loop(
                f"removing the instance {device_id}",
                self._source.remove_instance,
                device,
                late=settle,
            )
        except (DiscoveryError, ProbeTimeoutError) as err:
            log.error("cannot remove the temporary instance %s: %s", device_id, err)
            return
        if not recorded or not self._source.instance_exists(device_id):
            self._ledger.forget(device_id)

    async def run_idle(self) -> None:
        """Probe, one at a time, every type nobody has instantiated, whenever woken (opt-in);
        no instance is created before probes are allowed."""
        await self._allowed()
        self._wakeup.set()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            for parent, mdev_type in self._idle_types():
                try:
                    await self.probe(parent, mdev_type)
                except (ProbeError, NotFoundError) as err:
                    log.warning("probing type %s on %s: %s", mdev_type.type_id, parent.name, err)


async def _nothing() -> None:
    """No follow-up."""
