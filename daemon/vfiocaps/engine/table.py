"""The live devices: each with its cache key and probe state, changed in one place that tells."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import NotFoundError
from ..model import Device
from ..store import CapabilityKey
from .views import ProbeState


@dataclass(slots=True)
class DeviceEntry:
    """One live device, its key (None while its driver or QEMU is unknown) and its state."""

    device: Device
    key: CapabilityKey | None
    state: ProbeState = ProbeState.PENDING
    last_error: str = ""


class DeviceTable:
    """Live devices by id; every addition, state change and removal is told to the callbacks."""

    def __init__(
        self,
        *,
        added: Callable[[DeviceEntry], None],
        changed: Callable[[DeviceEntry], None],
        removed: Callable[[str], None],
    ) -> None:
        self._entries: dict[str, DeviceEntry] = {}
        self._added = added
        self._changed = changed
        self._removed = removed

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._entries

    def __iter__(self) -> Iterator[DeviceEntry]:
        return iter(list(self._entries.values()))

    def get(self, device_id: str) -> DeviceEntry | None:
        """The entry of *device_id*, if it is live."""
        return self._entries.get(device_id)

    def live(self, device_id: str) -> DeviceEntry:
        """The entry of a live device.

        Raises:
            NotFoundError: no live device has this id.
        """
        entry = self._entries.get(device_id)
        if entry is None:
            raise NotFoundError(f"no device {device_id!r}")
        return entry

    def at_path(self, sysfs_path: str | None) -> DeviceEntry:
        """The entry of the live device at a resolved sysfs path.

        Raises:
            NotFoundError: no live device is there.
        """
        for entry in self._entries.values():
            if entry.device.sysfs_path == sysfs_path:
                return entry
        raise NotFoundError(f"no device at {sysfs_path!r}")

    def ids(self) -> list[str]:
        """Ids of the live devices, sorted."""
        return sorted(self._entries)

    def waiting(self, key: CapabilityKey) -> list[DeviceEntry]:
        """The live devices whose answer is *key*'s."""
        return [entry for entry in self._entries.values() if entry.key == key]

    def put(self, entry: DeviceEntry) -> None:
        """Add *entry*, or replace the entry of the same id; tell which it was."""
        existing = self._entries.get(entry.device.device_id)
        self._entries[entry.device.device_id] = entry
        if existing is None:
            self._added(entry)
        else:
            self._changed(entry)

    def remove(self, device_id: str) -> bool:
        """Drop a device and tell; return whether it was live."""
        if self._entries.pop(device_id, None) is None:
            return False
        self._removed(device_id)
        return True

    def set_state(self, entry: DeviceEntry, state: ProbeState, error: str = "") -> None:
        """Change a device's state and tell (also when it is unchanged: its record may be new)."""
        entry.state, entry.last_error = state, error
        self._changed(entry)
