"""An engine in the test's own event loop: a fake host, a scripted prober, a clock moved by hand.

The store is a real SQLite file; only discovery and QEMU are replaced, by fakes that keep
their contracts: the source updates its snapshot before it yields an event, as discovery does,
and the runner answers with :class:`ProbeReport` values as the prober does.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
import uuid as uuidlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from vfiocaps.capabilities import (
    Capabilities,
    Display,
    LaunchRecord,
    Migration,
    ProbeOutcome,
    ProbeReport,
)
from vfiocaps.config import Config
from vfiocaps.discovery.instances import create_instance, instance_exists, remove_instance
from vfiocaps.engine import DeviceView, Engine, EngineStatus, Timings
from vfiocaps.errors import DiscoveryError, ProbeError
from vfiocaps.model import (
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
from vfiocaps.qemubinary import QemuBinary
from vfiocaps.runstate import Lifecycle
from vfiocaps.store import CapabilityStore

KERNEL = "6.1.0-test"


class ManualClock:
    """The loop's clock plus an offset the test moves forward, so timers fire without waiting."""

    EPOCH_US = 1_750_000_000_000_000

    def __init__(self) -> None:
        self.offset = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make *loop* keep time by this clock."""
        real = loop.time
        self._loop = loop
        loop.time = lambda: real() + self.offset  # type: ignore[method-assign]

    def advance(self, seconds: float) -> None:
        """Jump forward: every timer due by then fires at the loop's next turn."""
        self.offset += seconds

    def now_us(self) -> int:
        """Wall time in microseconds, as the engine's records keep it."""
        assert self._loop is not None, "install the clock first"
        return self.EPOCH_US + int(self._loop.time() * 1e6)


def driver(module: str = "mtty", version: str = "0.1") -> DriverIdentity:
    """A module's identity as discovery would report it."""
    return DriverIdentity(module, version, "module-version", KERNEL)


def parent(name: str = "mtty", module: str = "mtty", version: str = "0.1") -> Parent:
    """A parent device registered with the mdev core."""
    return Parent(
        name=name,
        sysfs_path=Path("/sys/devices/virtual") / name / name,
        subsystem="mdev_bus",
        driver=driver(module, version),
    )


def mdev_type(parent_name: str, type_id: str, available: int = 4) -> MdevType:
    """One supported type of *parent_name*."""
    return MdevType(parent_name, type_id, type_id.upper(), "", "vfio-pci", available)


def mdev(
    parent_name: str, type_id: str, uuid: str | None = None, group: str | None = "7"
) -> Device:
    """An mdev instance; *group* None stands for one whose driver has not bound yet."""
    device_id = uuid or str(uuidlib.uuid4())
    return Device(
        kind=DeviceKind.MDEV,
        device_id=device_id,
        sysfs_path=f"/sys/devices/virtual/{parent_name}/{parent_name}/{device_id}",
        parent=parent_name,
        type_id=type_id,
        iommu_group=group,
    )


def host(*devices: Device, types: tuple[str, ...] = ("mtty-1", "mtty-2", "mtty-3")) -> HostSnapshot:
    """A host with the mtty parent, its *types*, and *devices*."""
    owner = parent()
    return HostSnapshot(
        parents={owner.name: owner},
        types={(owner.name, t): mdev_type(owner.name, t) for t in types},
        devices={d.device_id: d for d in devices},
    )


class FakeDeviceSource:
    """Discovery's contract without sysfs: a snapshot, then the batches a test pushes."""

    def __init__(self, snapshot: HostSnapshot) -> None:
        self.snapshot = snapshot
        self._batches: asyncio.Queue[list[DiscoveryEvent] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.created: list[str] = []
        self.removed: list[str] = []
        self.closed = False
        self.refuse_create: str | None = None
        self.hold_removal: threading.Event | None = None
        self.removal_released: list[bool] = []
        self.on_remove: Callable[[Device], None] | None = None

    async def start(self) -> HostSnapshot:
        self._loop = asyncio.get_running_loop()
        return self.snapshot

    def recheck_profiles(self) -> list[str]:
        return []  # this source has no virtual functions

    def push(self, *events: DiscoveryEvent) -> None:
        """Queue one batch of events, as discovery yields what one read of udev gave.

        Safe from any thread: the engine calls instance writes from a worker thread.
        """
        self._loop.call_soon_threadsafe(self._batches.put_nowait, list(events))

    async def events(self) -> AsyncIterator[list[DiscoveryEvent]]:
        while (batch := await self._batches.get()) is not None:
            for event in batch:
                self._apply(event)
            yield batch

    def _apply(self, event: DiscoveryEvent) -> None:
        snap = self.snapshot
        if isinstance(event, DeviceAdded):
            snap.devices[event.device.device_id] = event.device
        elif isinstance(event, DeviceRemoved):
            snap.devices.pop(event.device.device_id, None)
        elif isinstance(event, ParentRegistered):
            snap.parents[event.parent.name] = event.parent
            for t in event.types:
                snap.types[(t.parent, t.type_id)] = t
        elif isinstance(event, ParentUnregistered):
            snap.parents.pop(event.parent.name, None)
            for ident in [i for i in snap.types if i[0] == event.parent.name]:
                del snap.types[ident]
        elif isinstance(event, DriverChanged):
            for name, p in list(snap.parents.items()):
                if p.driver is not None and p.driver.module == event.module:
                    snap.parents[name] = replace(p, driver=event.new)
        elif isinstance(event, Resynchronised):
            self.snapshot = event.snapshot

    async def close(self) -> None:
        self.closed = True

    def create_instance(self, owner: Parent, type_id: str, uuid: str = "") -> str:
        if self.refuse_create is not None:
            raise DiscoveryError(self.refuse_create)
        device = mdev(owner.name, type_id, uuid or None)
        self.created.append(device.device_id)
        self.push(DeviceAdded(device))
        return device.device_id

    def instance_exists(self, device_id: str) -> bool:
        return device_id in self.created and device_id not in self.removed

    def remove_instance(self, device: Device) -> None:
        if self.on_remove is not None:
            self.on_remove(device)
        if self.hold_removal is not None:
            # The kernel holds a removal while the device is open; released by the test.
            self.removal_released.append(self.hold_removal.wait(timeout=3))
        self.removed.append(device.device_id)
        if device.device_id in self.snapshot.devices:
            self.push(DeviceRemoved(device))


Step = ProbeOutcome | BaseException | Callable[[Device], ProbeOutcome]


@dataclass
class ScriptedRunner:
    """The prober's contract without QEMU: each probe takes the next step scripted for its type.

    A step is an outcome, an exception to raise, or a function of the device; with no step left
    the probe succeeds. A type's gate, while closed, holds its probes (to see them overlap).
    """

    qemu_binary: Path
    version: str = "10.0.3"
    steps: dict[str, deque[Step]] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    allowed: asyncio.Event = field(default_factory=asyncio.Event)
    probed: list[str] = field(default_factory=list)
    running: int = 0
    most_running: int = 0
    cancelled: int = 0
    identity_calls: int = 0
    properties: frozenset[str] = frozenset({"sysfsdev", "enable-migration"})
    properties_calls: list[bool] = field(default_factory=list)  # probes allowed at each
    handed: list[QemuBinary | None] = field(default_factory=list)  # the identity of each probe
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def script(self, type_id: str, *steps: Step) -> None:
        """Queue *steps* for the next probes of *type_id*."""
        self.steps.setdefault(type_id, deque()).extend(steps)

    def hold(self, type_id: str) -> asyncio.Event:
        """Hold the probes of *type_id* until the returned event is set."""
        return self.gates.setdefault(type_id, asyncio.Event())

    def __post_init__(self) -> None:
        self.allowed.set()  # as a daemon that owns its name; clear it to be a second daemon

    async def wait_allowed(self) -> None:
        await self.allowed.wait()

    async def read_qemu(self) -> QemuBinary:
        self.identity_calls += 1
        st = self.qemu_binary.stat()
        return QemuBinary(str(self.qemu_binary), self.version, st.st_ctime_ns, st.st_size)

    async def read_qemu_properties(self, qemu: QemuBinary) -> QemuBinary:
        self.properties_calls.append(self.allowed.is_set())
        st = self.qemu_binary.stat()
        return replace(
            qemu, ctime_ns=st.st_ctime_ns, size=st.st_size, vfio_pci_properties=self.properties
        )

    async def probe_device(
        self, device: Device, owner: Parent | None, qemu: QemuBinary | None
    ) -> ProbeReport:
        await self.wait_allowed()  # as the prober: no probe before the name is owned
        self.probed.append(device.device_id)
        self.handed.append(qemu)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            gate = self.gates.get(device.type_id)
            if gate is not None:
                try:
                    await gate.wait()
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            queued = self.steps.get(device.type_id)
            step: Step = queued.popleft() if queued else ProbeOutcome.OK
            if isinstance(step, BaseException):
                raise step
            outcome = step if isinstance(step, ProbeOutcome) else step(device)
        finally:
            self.running -= 1
        launch = LaunchRecord("probe", ("qemu",), 0.01, 0)
        if outcome is ProbeOutcome.OK:
            caps = Capabilities(Display.NONE, False, Migration.SUPPORTED, qemu_version=self.version)
            return ProbeReport(ProbeOutcome.OK, caps, launches=(launch,))
        return ProbeReport(outcome, None, error=f"scripted {outcome.value}", launches=(launch,))


@dataclass
class RecordingListener:
    """Every engine callback, in order."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changes: list[tuple[str, str]] = field(default_factory=list)
    invalidations: list[tuple[str, str, str, int]] = field(default_factory=list)
    statuses: list[EngineStatus] = field(default_factory=list)

    def device_added(self, view: DeviceView) -> None:
        self.added.append(view.device.device_id)

    def device_changed(self, view: DeviceView) -> None:
        self.changes.append((view.device.device_id, view.state.value))

    def device_removed(self, device_id: str) -> None:
        self.removed.append(device_id)

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None:
        self.invalidations.append((driver, old, new, records))

    def status_changed(self, status: EngineStatus) -> None:
        self.statuses.append(status)


def rig_config(directory: Path, **overrides: object) -> Config:
    """A configuration whose every path lies under *directory*; the QEMU binary is a file."""
    binary = directory / "qemu-system-x86_64"
    if not binary.exists():
        directory.mkdir(parents=True, exist_ok=True)
        binary.write_text("qemu 10.0.3\n")
    values: dict[str, object] = {
        "sysfs_root": directory / "sys",
        "dev_root": directory / "dev",
        "cache_dir": directory / "cache",
        "runtime_dir": directory / "run",
        "qemu_binary": binary,
        "kernel_release": KERNEL,
        "probe_retry_seconds": 30.0,
        "probe_concurrency": 2,
        # The rig's clock is a fake one and the settle time is real time: the rig's devices
        # are probed at once (the settle time is tested on the daemon, test_libvirt_hook).
        "probe_settle_seconds": 0.0,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


class FailingPropertiesRunner(ScriptedRunner):
    """A runner whose QEMU answers ``-version`` but not the properties question."""

    async def read_qemu_properties(self, qemu: QemuBinary) -> QemuBinary:
        self.properties_calls.append(self.allowed.is_set())
        raise ProbeError("QEMU did not answer within 10.0s")


@dataclass
class EngineRig:
    """A running engine and the fakes around it."""

    engine: Engine
    source: FakeDeviceSource
    runner: ScriptedRunner
    clock: ManualClock
    listener: RecordingListener
    config: Config
    task: asyncio.Task[None]
    lifecycle: Lifecycle

    async def until(self, condition: Callable[[], bool], what: str, limit: float = 5.0) -> None:
        """Let the engine run until *condition* holds (real time passes only for SQLite).

        Raises:
            AssertionError: *condition* still fails after *limit* seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not condition():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.001)

    async def idle(self) -> None:
        """Let every ready callback run (a few loop turns), with no time passing."""
        for _ in range(20):
            await asyncio.sleep(0)

    def states(self) -> dict[str, str]:
        """Each live device's probe state."""
        return {view.device.device_id: view.state.value for view in self.engine.views()}

    async def settle(self, state: str = "done") -> None:
        """Wait until every live device is in *state*."""
        await self.until(
            lambda: set(self.states().values()) == {state}, f"every device to be {state}"
        )

    async def stop(self) -> None:
        """Stop the engine as the daemon does: cancel its task and wait."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def start_rig(
    directory: Path,
    snapshot: HostSnapshot,
    *,
    runner: ScriptedRunner | None = None,
    clock: ManualClock | None = None,
    boot_id: str = "4a1c8a52-3c1e-4a57-9a43-7c51d0f0b001",
    timings: Timings | None = None,
    **config: object,
) -> EngineRig:
    """Start an engine on *snapshot* with its cache under *directory* and wait until it serves."""
    cfg = rig_config(directory, **config)
    clock = clock or ManualClock()
    if clock._loop is None:
        clock.install(asyncio.get_running_loop())
    source = FakeDeviceSource(snapshot)
    runner = runner or ScriptedRunner(cfg.qemu_binary)
    boot_id_path = directory / "boot_id"
    boot_id_path.write_text(boot_id + "\n")
    store = CapabilityStore(cfg.database_path)
    lifecycle = Lifecycle()
    lifecycle.begin_learning()
    engine = Engine(
        cfg,
        source,
        runner,
        store,
        lifecycle=lifecycle,
        clock_us=clock.now_us,
        timings=timings or Timings(),
        boot_id_path=boot_id_path,
    )
    listener = RecordingListener()
    engine.subscribe(listener)

    async def serve() -> None:  # as the daemon once it owns its name
        lifecycle.begin_serving()

    task = asyncio.create_task(engine.run(serve))
    rig = EngineRig(engine, source, runner, clock, listener, cfg, task, lifecycle)
    serving = asyncio.ensure_future(lifecycle.wait_serving())
    await asyncio.wait({serving, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        serving.cancel()
        task.result()
    return rig


class SysfsInstanceSource(FakeDeviceSource):
    """The fake source, but temporary instances are made and removed through a sysfs tree
    under *sysfs_root* with discovery's own writers; the test plays the kernel. Removing an
    instance (``echo 1 > remove``) takes its directory away at once, as the kernel does."""

    def __init__(self, snapshot: HostSnapshot, sysfs_root: Path) -> None:
        super().__init__(snapshot)
        self.sysfs_root = sysfs_root

    def create_instance(self, owner: Parent, type_id: str, uuid: str = "") -> str:
        return create_instance(self.sysfs_root, owner, type_id, uuid)

    def instance_exists(self, device_id: str) -> bool:
        return instance_exists(self.sysfs_root, device_id)

    def remove_instance(self, device: Device) -> None:
        link = self.device_dir(device)
        remove_instance(self.sysfs_root, replace(device, sysfs_path=str(link)))
        self.removed.append(device.device_id)
        shutil.rmtree(link.resolve())
        link.unlink()

    def device_dir(self, device: Device) -> Path:
        return self.sysfs_root / "bus" / "mdev" / "devices" / device.device_id
