"""Devices a domain (a VM) holds: no probe touches them until the domain releases them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BusyError, InvalidArgumentError
from ..model import Device
from ..store import CapabilityKey
from .scheduler import ProbeScheduler
from .table import DeviceEntry, DeviceTable
from .views import ProbeState

log = logging.getLogger(__name__)

# A host runs at most a few hundred VMs; a domain has at most a few dozen host devices.
MAX_DOMAINS = 1024
MAX_DEVICES_PER_DOMAIN = 256
# The longest a hold waits for the probes it stops (QEMU killed and reaped: milliseconds).
STOP_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Hold:
    """The devices one domain is about to use or uses, and the IOMMU groups they are in."""

    domain: str  # the domain's UUID: the key a release names
    name: str  # the domain's name, for messages
    devices: frozenset[str]
    groups: frozenset[str] = frozenset()

    def reason(self) -> str:
        """What a held device's state says."""
        return f"held by domain {self.name}; probed when it releases the device"


class ProbeGate:
    """Holds by domain, bounded in number and size; kept in memory only.

    Nothing survives a restart: a domain that runs then holds its devices' VFIO groups open,
    and the prober skips a group that is open elsewhere. A device is held when a domain names
    it, or names a device of its IOMMU group (VFIO opens whole groups).
    """

    def __init__(
        self, *, max_domains: int = MAX_DOMAINS, max_devices: int = MAX_DEVICES_PER_DOMAIN
    ) -> None:
        self._max_domains = max_domains
        self._max_devices = max_devices
        self._holds: dict[str, Hold] = {}
        self._by_device: dict[str, Hold] = {}
        self._by_group: dict[str, Hold] = {}
        self._avoided: dict[str, str] = {}  # device id -> why, not for a domain

    def __len__(self) -> int:
        return len(self._holds)

    def holder(self, device: Device) -> Hold | None:
        """The hold that keeps probes off *device*, if any."""
        hold = self._by_device.get(device.device_id)
        if hold is None and device.iommu_group:
            hold = self._by_group.get(device.iommu_group)
        return hold

    def blocks(self, device: Device) -> str | None:
        """Why no probe may touch *device* now, or None when one may."""
        hold = self.holder(device)
        return hold.reason() if hold is not None else self._avoided.get(device.device_id)

    def avoid(self, device_id: str, reason: str | None) -> None:
        """Keep probes off *device_id* for *reason* (another instance answers for it), or
        no longer (None). The daemon's own choice: bounded by its own instances."""
        if reason is None:
            self._avoided.pop(device_id, None)
        else:
            self._avoided[device_id] = reason

    def hold(self, hold: Hold) -> None:
        """Record *hold*, replacing the domain's earlier one.

        Raises:
            InvalidArgumentError: the hold names more devices than a domain may hold.
            BusyError: as many other domains hold devices as this daemon keeps.
        """
        if len(hold.devices) > self._max_devices:
            raise InvalidArgumentError(
                f"a domain holds at most {self._max_devices} devices, {len(hold.devices)} given"
            )
        if hold.domain not in self._holds and len(self._holds) >= self._max_domains:
            raise BusyError(
                f"{len(self._holds)} domains hold devices already, the most this daemon keeps; "
                "release the holds of domains that stopped"
            )
        self.release(hold.domain)
        self._holds[hold.domain] = hold
        self._by_device.update(dict.fromkeys(hold.devices, hold))
        self._by_group.update(dict.fromkeys(hold.groups, hold))

    def release(self, domain: str) -> Hold | None:
        """Drop the hold of *domain*; return it (None when it held nothing)."""
        hold = self._holds.pop(domain, None)
        if hold is None:
            return None
        for index in (self._by_device, self._by_group):
            for name in [name for name, owner in index.items() if owner is hold]:
                del index[name]
        # Another domain may name the same device (a start that failed, a migration): keep its.
        for other in self._holds.values():
            for device_id in other.devices:
                self._by_device.setdefault(device_id, other)
            for group in other.groups:
                self._by_group.setdefault(group, other)
        return hold


class DomainHolds:
    """Records domains' holds in a :class:`ProbeGate` and moves the devices' probes."""

    def __init__(
        self,
        table: DeviceTable,
        gate: ProbeGate,
        scheduler: ProbeScheduler,
        resolve: Callable[[CapabilityKey | None, Device], tuple[ProbeState, str]],
    ) -> None:
        self._table = table
        self._gate = gate
        self._scheduler = scheduler
        self._resolve = resolve

    async def hold(self, domain: str, name: str, device_ids: list[str]) -> list[str]:
        """Keep probes off the devices domain *domain* (named *name*) is about to use, until
        :meth:`release`: a probe running on one is stopped, its QEMU reaped and its nodes given
        back before this returns; it caches nothing. Return the live devices now held.

        Raises:
            InvalidArgumentError: too many devices for one domain.
            BusyError: too many domains hold devices.
        """
        started = time.monotonic()
        live = [e for i in device_ids if (e := self._table.get(i)) is not None]
        groups = frozenset(g for e in live if (g := e.device.iommu_group))
        self._gate.hold(Hold(domain, name, frozenset(device_ids), groups))
        held = [e for e in self._table if self._gate.holder(e.device) is not None]
        reason = f"domain {name} is starting on it"
        stopped = {e.device.device_id for e in held}
        await self._scheduler.yield_devices(stopped, reason, STOP_SECONDS)
        for entry in held:
            why = self._gate.blocks(entry.device)
            if why is not None and entry.state is not ProbeState.DONE:
                self._table.set_state(entry, ProbeState.BUSY, why)
        log.info(
            "domain %s holds %s (%.3f s, probes stopped included)",
            name,
            ", ".join(sorted(device_ids)) or "nothing",
            time.monotonic() - started,
        )
        return sorted(e.device.device_id for e in held)

    def release(self, domain: str) -> list[str]:
        """Let probes at the devices *domain* held again; those without an answer are queued
        at once. Return the live devices released (none when the domain held nothing)."""
        hold = self._gate.release(domain)
        if hold is None:
            return []
        released: list[DeviceEntry] = [
            e
            for e in self._table
            if self._gate.holder(e.device) is None
            and (e.device.device_id in hold.devices or e.device.iommu_group in hold.groups)
        ]
        for entry in released:
            if entry.state is not ProbeState.DONE and entry.key is not None:
                state, error = self._resolve(entry.key, entry.device)
                self._table.set_state(entry, state, error)
                if state in (ProbeState.PENDING, ProbeState.PROBING):
                    self._scheduler.enqueue(entry.key)
        log.info("domain %s released its devices", hold.name)
        return sorted(e.device.device_id for e in released)
