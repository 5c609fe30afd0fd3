"""What the engine shows and needs: device and type views, status, listener, source, runner."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..capabilities import Capabilities, ProbeReport
from ..model import Device, DiscoveryEvent, DriverIdentity, HostSnapshot, Parent, TypeKind
from ..qemubinary import QemuBinary


class ProbeState(enum.Enum):
    """Where a device stands with respect to its capabilities."""

    PENDING = "pending"
    PROBING = "probing"
    DONE = "done"
    FAILED = "failed"
    BUSY = "busy"


class CacheState(enum.Enum):
    """Whether the on-disk cache follows memory (``OK``) or writes wait in memory (``DEGRADED``)."""

    OK = "ok"
    DEGRADED = "degraded"


class Answer(NamedTuple):
    """What a probe learned of a type, with the driver it was learned from."""

    capabilities: Capabilities
    driver: DriverIdentity


def answer_of(capabilities: Capabilities | None, driver: DriverIdentity | None) -> Answer | None:
    """The one rule for "probed": capabilities are known, and the driver they were learned from."""
    if capabilities is None or driver is None:
        return None
    return Answer(capabilities, driver)


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
    parent_pci_id: str = ""  # vvvv:dddd of the PCI device behind it, as its cache key has it

    @property
    def answer(self) -> Answer | None:
        """The device's type's answer, or None when it has none yet."""
        return answer_of(self.capabilities, self.driver)


@dataclass(frozen=True, slots=True)
class TypeView:
    """An mdev type, a VF profile or a PCI device type, with its live instances and cached
    answer; ``kind`` says which."""

    parent: str
    type_id: str
    name: str
    description: str
    device_api: str
    available_instances: int
    instances: int
    driver: DriverIdentity | None
    capabilities: Capabilities | None
    kind: TypeKind = TypeKind.MDEV
    parent_pci_id: str = ""  # vvvv:dddd of the PCI device behind the type
    requires: str = ""  # what must exist before an instance can be made (MdevType.requires)

    @property
    def answer(self) -> Answer | None:
        """The type's answer, or None when it has none yet."""
        return answer_of(self.capabilities, self.driver)


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """Daemon-wide state for the Manager interface; ``cache_error`` says why the cache degraded."""

    qemu: QemuBinary | None
    kernel_release: str
    kvm_available: bool
    probing: bool
    device_count: int
    probes_launched: int
    cache_state: CacheState
    cache_error: str = ""


@dataclass(frozen=True, slots=True)
class Timings:
    """The engine's own waits in seconds (probe timeouts and retries are in the configuration)."""

    qemu_check: float = 30.0  # between two looks at the QEMU binary
    store_retry: float = 5.0  # after a failed cache write
    instance_appear: float = 10.0  # for a created temporary instance to be discovered
    sysfs_write: float = 10.0  # for the kernel to create or remove an instance


class EngineListener(Protocol):
    """Callbacks the engine makes; they must be quick and must not raise."""

    def device_added(self, view: DeviceView) -> None: ...

    def device_changed(self, view: DeviceView) -> None: ...

    def device_removed(self, device_id: str) -> None: ...

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None: ...

    def status_changed(self, status: EngineStatus) -> None: ...


class DeviceSource(Protocol):
    """What the engine needs from discovery."""

    @property
    def snapshot(self) -> HostSnapshot: ...

    async def start(self) -> HostSnapshot: ...

    def events(self) -> AsyncIterator[list[DiscoveryEvent]]: ...

    async def close(self) -> None: ...

    def create_instance(self, parent: Parent, type_id: str, uuid: str = "") -> str: ...

    def remove_instance(self, device: Device) -> None: ...

    def instance_exists(self, device_id: str) -> bool: ...

    def recheck_profiles(self) -> list[str]:
        """Read again every VF whose vGPU profile changed unannounced; return them."""
        ...


class ProbeRunner(Protocol):
    """What the engine needs from the prober (:class:`vfiocaps.prober.Prober` is one)."""

    async def read_qemu(self) -> QemuBinary:
        """Ask the configured QEMU binary who it is (its version; the properties left unasked).

        Raises:
            ProbeError: the binary cannot be asked.
        """
        ...

    async def read_qemu_properties(self, qemu: QemuBinary) -> QemuBinary:
        """*qemu* with its ``vfio-pci`` properties, and the change time and size of the file
        asked.

        Raises:
            ProbeError: the binary cannot be asked.
        """
        ...

    async def probe_device(
        self, device: Device, parent: Parent | None, qemu: QemuBinary | None
    ) -> ProbeReport:
        """Probe *device* with the binary *qemu* (the engine's identity of it; ``None``: the
        runner reads it); device-level failures are in the report, not raised."""
        ...

    async def wait_allowed(self) -> None:
        """Return once probes may change the host (lend nodes, create instances): when the
        daemon owns its name, so that a second daemon, which will not get it, changes nothing."""
        ...
