"""The D-Bus adaptor: publishes the engine's devices as objects and serves the Manager's calls."""

from __future__ import annotations

import logging

from dbus_fast import Variant

from .. import fingerprint
from ..config import Config
from ..domainxml import Viewer
from ..engine import CacheState, DeviceView, Engine, EngineStatus, ProbeState
from ..engine.domain import DomainAnswers
from ..errors import InvalidArgumentError, NotFoundError
from ..runstate import Lifecycle, RunState
from .calls import WaitsPerSender, current_caller, note_caller
from .connection import ResilientMessageBus
from .device import DeviceObjects, device_path
from .manager import ManagerInterface, ManagerState
from .names import ROOT_PATH
from .polkit import Authority
from .validation import (
    parse_device_id,
    parse_domain,
    parse_driver_name,
    parse_held_devices,
    parse_type_name,
)
from .values import capabilities_dict, type_dict

log = logging.getLogger(__name__)

ACTION_REFRESH = "org.vfiocaps.refresh"
ACTION_INVALIDATE = "org.vfiocaps.invalidate"
ACTION_PROBE_TYPE = "org.vfiocaps.probe-type"
ACTION_HOLD = "org.vfiocaps.hold-devices"
# GetCapabilities and DomainXml calls one sender may have waiting for a probe at once.
WAITS_PER_SENDER = 32


def cache_state_text(status: EngineStatus) -> str:
    """The ``CacheState`` property: ``ok``, or ``degraded: <why>``."""
    if status.cache_state is CacheState.OK:
        return "ok"
    return f"{status.cache_state.value}: {status.cache_error}"


class BusAdaptor:
    """Keeps the bus objects in step with the engine; everything it registers it unregisters."""

    def __init__(
        self, bus: ResilientMessageBus, engine: Engine, config: Config, lifecycle: Lifecycle
    ) -> None:
        self._bus = bus
        self._lifecycle = lifecycle
        self._engine = engine
        self._config = config
        self._authority = Authority(bus, timeout=config.authorization_timeout)
        self._manager = ManagerInterface(self, str(config.qemu_binary))
        self._devices = DeviceObjects(bus, self._refresh_by_id)
        self._domains = DomainAnswers(engine.views, config.dev_root, emulated=config.emulated)
        self._waits = WaitsPerSender(WAITS_PER_SENDER)

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Export the root object and every current device, then follow the engine and the
        run-state (which says when the bus announces)."""
        self._bus.lifecycle = self._lifecycle
        self._bus.object_manager_root = ROOT_PATH
        self._bus.add_message_handler(note_caller)
        self._bus.export(ROOT_PATH, self._manager)
        self._devices.start()
        self._lifecycle.watch(self.run_state_changed)
        self._engine.subscribe(self)
        for view in self._engine.views():
            self.device_added(view)
        self.status_changed(self._engine.status)

    def stop(self) -> None:
        """Unexport everything and stop following the engine. Idempotent."""
        if not self._devices.started:
            return
        try:
            self._lifecycle.unwatch(self.run_state_changed)
            self._engine.unsubscribe(self)
            self._devices.stop()
            self._bus.unexport(ROOT_PATH, self._manager)
        finally:
            self._bus.remove_message_handler(note_caller)

    # ---- engine listener ------------------------------------------------------------------

    def device_added(self, view: DeviceView) -> None:
        self._devices.add(view)

    def device_changed(self, view: DeviceView) -> None:
        self._devices.update(view)

    def device_removed(self, device_id: str) -> None:
        self._devices.remove(device_id)

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None:
        self._manager.CacheInvalidated(driver, old, new, records)

    def status_changed(self, status: EngineStatus) -> None:
        self._manager.update(
            ManagerState(
                qemu_binary=str(self._config.qemu_binary),
                qemu_version=status.qemu.version if status.qemu else "",
                kernel_release=status.kernel_release,
                kvm_available=status.kvm_available,
                probing=status.probing,
                device_count=status.device_count,
                probe_count=status.probes_launched,
                cache_state=cache_state_text(status),
                emulated=self._config.emulated,
                run_state=self._lifecycle.state.value,
            )
        )

    def run_state_changed(self, state: RunState) -> None:
        self.status_changed(self._engine.status)

    def require_serving(self, member: str) -> None:
        self._lifecycle.require_serving(member)

    # ---- manager backend ------------------------------------------------------------------

    def _lookup(self, device_id: str) -> DeviceView:
        ref = parse_device_id(device_id, self._config.sysfs_root)
        return self._engine.find(device_id=ref.device_id, sysfs_path=ref.sysfs_path)

    def list_devices(self) -> list[str]:
        return [device_path(device_id) for device_id in self._engine.device_ids()]

    def get_device(self, device_id: str) -> str:
        view = self._lookup(device_id)
        if self._devices.get(view.device.device_id) is None:
            raise NotFoundError(f"no device {device_id!r}")
        return device_path(view.device.device_id)

    async def _settled(self, device_id: str) -> DeviceView:
        view = self._lookup(device_id)
        return await self._settled_by_id(view.device.device_id)

    async def _settled_by_id(self, device_id: str) -> DeviceView:
        with self._waits.hold(current_caller().sender):
            return await self._engine.settled(device_id, self._config.probe_timeout * 3)

    async def get_capabilities(self, device_id: str) -> dict[str, Variant]:
        ref = parse_device_id(device_id, self._config.sysfs_root)
        known = ref.device_id
        if known is None:
            known = self._engine.find(sysfs_path=ref.sysfs_path).device.device_id
        if self._engine.probe_state(known) in (ProbeState.PENDING, ProbeState.PROBING):
            await self._settled_by_id(known)
        device = self._devices.get(known)
        if device is not None:
            return device.capabilities()
        return capabilities_dict(self._engine.view(known))

    def list_types(self) -> list[dict[str, Variant]]:
        return [type_dict(view) for view in self._engine.types()]

    async def refresh(self, device_id: str) -> dict[str, Variant]:
        await self._engine.recheck_profiles()  # a VF's profile may have been set just now
        view = self._lookup(device_id)
        return await self._refresh_by_id(view.device.device_id)

    async def _refresh_by_id(self, device_id: str) -> dict[str, Variant]:
        self._lifecycle.require_serving("Refresh")  # also a device object's Refresh
        caller = current_caller()
        await self._authority.check(caller.sender, ACTION_REFRESH, caller.interactive)
        return capabilities_dict(await self._engine.refresh(device_id))

    async def invalidate(self, driver: str) -> int:
        module = parse_driver_name(driver)
        caller = current_caller()
        await self._authority.check(caller.sender, ACTION_INVALIDATE, caller.interactive)
        return self._engine.invalidate(module)

    async def probe_type(self, parent: str, type_id: str) -> dict[str, Variant]:
        parent_name, mdev_type = parse_type_name(parent, type_id)
        caller = current_caller()
        await self._authority.check(caller.sender, ACTION_PROBE_TYPE, caller.interactive)
        return type_dict(await self._engine.probe_type(parent_name, mdev_type))

    async def hold_devices(self, domain: str, name: str, devices: list[str]) -> list[str]:
        domain_uuid, domain_name = parse_domain(domain, name)
        held = parse_held_devices(devices)
        caller = current_caller()
        await self._authority.check(caller.sender, ACTION_HOLD, caller.interactive)
        return await self._engine.holds.hold(domain_uuid, domain_name, held)

    async def release_devices(self, domain: str) -> list[str]:
        domain_uuid, _ = parse_domain(domain, "-")
        caller = current_caller()
        await self._authority.check(caller.sender, ACTION_HOLD, caller.interactive)
        return self._engine.holds.release(domain_uuid)

    async def domain_xml(self, device_id: str) -> str:
        view = await self._settled(device_id)
        return self._domains.parts(view, Viewer.REMOTE).fragment()

    async def domain_xml_parts(self, device_id: str, viewer: str) -> dict[str, str]:
        chosen = Viewer.parse(viewer)
        view = await self._settled(device_id)
        return self._domains.parts(view, chosen).by_name()

    async def migration_fingerprint(self, device_id: str) -> str:
        return self._domains.fingerprint(await self._settled(device_id)).to_json()

    async def check_migration(
        self, document: str, device_id: str
    ) -> tuple[str, list[tuple[str, str, str]]]:
        try:
            source = fingerprint.parse(document)
        except fingerprint.FingerprintError as err:
            raise InvalidArgumentError(f"not a usable fingerprint: {err}") from err
        views = [await self._settled(device_id)] if device_id else None
        return self._domains.check(source, views)
