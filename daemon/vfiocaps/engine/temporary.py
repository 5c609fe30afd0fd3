"""A user's new instance: left alone while it settles, or answered by a temporary instance."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import Config
from ..errors import NotFoundError, ProbeError
from ..model import Device, DeviceKind, HostSnapshot
from ..store import CapabilityKey
from ..tasks import TaskSet
from .holds import ProbeGate
from .scheduler import ProbeScheduler
from .table import DeviceEntry
from .typeprobe import TypeProber
from .views import ProbeState

log = logging.getLogger(__name__)

# Types answered through a temporary instance at once; beyond, users' instances are probed.
MAX_AT_ONCE = 8
_WAITING = (ProbeState.PENDING, ProbeState.PROBING)


class NewInstances:
    """Queues the probe of a device that needs one.

    An mdev a user created while the daemon runs may have a VM starting on it right now (a
    probe holds its VFIO group, and VFIO gives a group one opener): its probe waits
    ``probe_settle_seconds`` first. With ``prefer_temporary_instances``, where its type has room,
    a temporary instance of the type is probed instead and the user's instance is kept out of
    probes meanwhile; it then has its type's answer, or is queued after all when the temporary
    instance gave none.
    """

    def __init__(
        self,
        config: Config,
        gate: ProbeGate,
        scheduler: ProbeScheduler,
        types: TypeProber,
        tasks: TaskSet,
        *,
        learned: Callable[[], bool],
        snapshot: Callable[[], HostSnapshot],
        resolve: Callable[[CapabilityKey | None, Device], tuple[ProbeState, str]],
        entry: Callable[[str], DeviceEntry | None],
    ) -> None:
        self._settle_seconds = config.probe_settle_seconds
        self._prefer_temporary = config.prefer_temporary_instances
        self._gate = gate
        self._scheduler = scheduler
        self._types = types
        self._tasks = tasks
        self._learned = learned
        self._snapshot = snapshot
        self._resolve = resolve
        self._entry = entry
        self._active: set[tuple[str, str]] = set()

    def queue(self, entry: DeviceEntry, *, appeared: bool) -> None:
        """Queue *entry*'s probe (it has a key and no answer); *appeared*: it is new."""
        if entry.key is None:
            return
        device = entry.device
        users_new = (
            appeared
            and self._learned()
            and device.kind is DeviceKind.MDEV
            and not self._types.is_temporary(device)
        )
        if users_new and self._prefer_temporary and self._take(device):
            return
        self._scheduler.enqueue(entry.key, delay=self._settle_seconds if users_new else 0.0)

    def _take(self, device: Device) -> bool:
        """Answer *device* through a temporary instance of its type if the type has room and
        none is being probed; return whether it was taken (then it is not queued)."""
        ident = (device.parent, device.type_id)
        mdev_type = self._snapshot().types.get(ident)
        if mdev_type is None or mdev_type.available_instances <= 0:
            return False
        if ident in self._active or len(self._active) >= MAX_AT_ONCE:
            return False
        self._active.add(ident)
        self._gate.avoid(device.device_id, "waiting for a temporary instance of its type")
        self._tasks.spawn(self._probe_instead(device.device_id, ident))
        return True

    async def _probe_instead(self, device_id: str, ident: tuple[str, str]) -> None:
        snapshot = self._snapshot()
        parent, mdev_type = snapshot.parents.get(ident[0]), snapshot.types.get(ident)
        try:
            if parent is not None and mdev_type is not None:
                await self._types.probe(parent, mdev_type)
        except (ProbeError, NotFoundError) as err:
            log.warning("no answer from a temporary instance for %s: %s", device_id, err)
        finally:
            self._active.discard(ident)
            self._gate.avoid(device_id, None)
            entry = self._entry(device_id)
            key = entry.key if entry is not None else None
            if (
                entry is not None
                and key is not None
                and self._resolve(key, entry.device)[0] in _WAITING
            ):
                self._scheduler.enqueue(key, delay=self._settle_seconds)
