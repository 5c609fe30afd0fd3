"""Creating and removing mdev instances through sysfs, for probing types nobody instantiated."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..bootid import BOOT_ID_PATH
from ..errors import DiscoveryError
from ..hostpaths import DEV_ROOT
from ..ids import is_mdev_uuid, is_sysfs_name, name_problem
from ..ledger import Ledger, LedgerFormat, Recovery
from ..model import Device, DeviceKind, Parent
from ..statefile import OwnerLock
from ..vfiogroup import group_node, held_elsewhere
from .attributes import AttributeWriteError, write_attribute
from .sysfs import SysfsTree

log = logging.getLogger(__name__)


class InstanceError(DiscoveryError):
    """An mdev instance could not be created or removed."""


def _write(tree: SysfsTree, path: Path, value: str) -> None:
    """:func:`write_attribute`, its failure as an :class:`InstanceError`."""
    try:
        write_attribute(tree, path, value)
    except AttributeWriteError as err:
        raise InstanceError(str(err)) from err


def new_instance_uuid() -> str:
    """A fresh UUID for a temporary instance (chosen, and recorded, before it is created)."""
    import uuid  # only when an instance is created: it imports platform, which the start skips

    return str(uuid.uuid4())


def create_instance(sysfs_root: Path, parent: Parent, type_id: str, uuid: str) -> str:
    """Create the instance *uuid* of *type_id* on *parent* (``echo UUID > .../create``); return
    the UUID.

    Raises:
        InstanceError: the type id or UUID is malformed, the type is missing, or the kernel
            refused.
    """
    problem = name_problem(type_id)
    if problem is not None:
        raise InstanceError(f"not an mdev type id: {type_id[:80]!r} ({problem})")
    if not is_mdev_uuid(uuid):
        raise InstanceError(f"not an mdev UUID: {uuid[:80]!r}")
    tree = SysfsTree(sysfs_root)
    create = parent.sysfs_path / "mdev_supported_types" / type_id / "create"
    _write(tree, create, uuid)
    log.info("created temporary instance %s of %s on %s", uuid, type_id, parent.name)
    return uuid


def instance_exists(sysfs_root: Path, uuid: str) -> bool:
    """Whether the mdev *uuid* exists now. Raises nothing."""
    return is_mdev_uuid(uuid) and os.path.lexists(sysfs_root / "bus" / "mdev" / "devices" / uuid)


def group_held(dev_root: Path, group: str) -> bool:
    """Whether the VFIO group node of *group* is open elsewhere (a VM holds the device); a node
    that cannot be opened counts as held: nothing is done to a device one cannot vouch for."""
    try:
        return held_elsewhere(group_node(dev_root, group))
    except OSError as err:
        log.warning("cannot open the group node of %s (%s); treated as in use", group, err)
        return True


def remove_instance(sysfs_root: Path, device: Device) -> None:
    """Remove an mdev instance (``echo 1 > .../remove``).

    Raises:
        InstanceError: *device* is not an mdev, or the kernel refused (the device is in use).
    """
    if device.kind is not DeviceKind.MDEV:
        raise InstanceError(f"{device.device_id} is not an mdev instance")
    _write(SysfsTree(sysfs_root), Path(device.sysfs_path) / "remove", "1")
    log.info("removed temporary instance %s", device.device_id)


@dataclass(frozen=True)
class InstanceRecord:
    """A temporary instance this daemon creates, recorded before it is created."""

    uuid: str
    boot_id: str
    pid: int  # the vfiocapsd that created it
    started: str = ""  # when that vfiocapsd started ("": not known, as in older records)
    parent: str = ""  # its parent and type ("": not known, as in older records)
    type_id: str = ""

    def valid(self) -> bool:
        return (
            is_mdev_uuid(self.uuid)
            and 0 < len(self.boot_id) <= 64
            and self.pid >= 0
            and len(self.started) <= 24
            and (self.parent == "" or is_sysfs_name(self.parent))
            and (self.type_id == "" or is_sysfs_name(self.type_id))
        )

    @classmethod
    def from_value(cls, name: str, values: Any) -> InstanceRecord:
        """A record as read from the file *name* (records of older versions name neither the
        UUID, which is the file's name, nor the start time, parent or type).

        Raises:
            KeyError, TypeError, ValueError, AttributeError: it is no such record.
        """
        return cls(
            uuid=str(values.get("uuid", name)),
            boot_id=str(values["boot_id"]),
            pid=int(values["pid"]),
            started=str(values.get("started", "")),
            parent=str(values.get("parent", "")),
            type_id=str(values.get("type_id", "")),
        )


INSTANCE_RECORDS: LedgerFormat[InstanceRecord] = LedgerFormat(
    what="temporary instance record",
    name_of=lambda record: record.uuid,
    is_entry_name=is_mdev_uuid,
    encode=asdict,
    decode=InstanceRecord.from_value,
    valid=InstanceRecord.valid,
    boot_of=lambda record: record.boot_id,
)


class InstanceLedger:
    """The temporary instances this daemon created, one file each, so a crash does not leak them.

    A record holds the boot id, the creating daemon's pid and start time, the instance's UUID,
    parent and type; it is written before the instance is created (the UUID is chosen first) and
    dropped only once the instance is seen gone. At start, :meth:`remove_leftovers` removes the
    instances of an earlier daemon of this boot that died with them, unless the instance is no
    longer the one recorded (another parent or type: left alone, record dropped) or a VM holds
    it (its VFIO group is open elsewhere: left alone, record kept for a later start); records of
    another boot are dropped (the instances went with that boot), and those of a daemon still
    running (it holds its owner lock here) are left to it. The directory is the daemon's own
    runtime directory; the UUID alone chooses the instance, so a record can name no other file.
    """

    def __init__(
        self,
        directory: Path,
        boot_id_path: Path = BOOT_ID_PATH,
        *,
        dev_root: Path = DEV_ROOT,
        held: Callable[[Path, str], bool] = group_held,
    ) -> None:
        self.directory = directory
        self._ledger = Ledger(directory, INSTANCE_RECORDS, boot_id_path)
        self._owner = OwnerLock(directory)
        self._dev_root = dev_root
        self._held = held

    def record(self, uuid: str, parent: str = "", type_id: str = "") -> None:
        """Note that this daemon creates *uuid* (of *type_id* on *parent*), before it does.

        Raises:
            InstanceError: the record cannot be written (then the instance must not be made).
        """
        if not is_mdev_uuid(uuid):
            raise InstanceError(f"not an mdev UUID: {uuid[:80]!r}")
        entry = InstanceRecord(
            uuid, self._ledger.boot_id(), os.getpid(), self._owner.started(), parent, type_id
        )
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owner.hold()
            self._ledger.add(entry)
        except (OSError, ValueError) as err:
            raise InstanceError(f"cannot record the temporary instance {uuid}: {err}") from err

    def forget(self, uuid: str) -> None:
        """The instance is gone: drop its record. Raises nothing."""
        self._ledger.discard(uuid)

    def recorded(self) -> list[str]:
        """UUIDs recorded now, by any daemon."""
        return self._ledger.names()

    def remove_leftovers(self, sysfs_root: Path) -> list[str]:
        """Remove the instances recorded by dead daemons of this boot; return their UUIDs.

        Raises nothing: an instance that cannot be removed keeps its record for the next start.
        """

        def alive(entry: InstanceRecord) -> bool:
            return entry.pid != os.getpid() and self._owner.alive(entry.pid, entry.started)

        removed = self._ledger.recover(alive, lambda entry: self._remove(sysfs_root, entry))
        return [entry.uuid for entry in removed]

    def _remove(self, sysfs_root: Path, entry: InstanceRecord) -> Recovery:
        """Remove the leftover instance of *entry*, unless it is gone, no longer the one
        recorded, or in use."""
        uuid = entry.uuid
        device = sysfs_root / "bus" / "mdev" / "devices" / uuid
        if not os.path.lexists(device):
            return Recovery.GONE
        if not self._still_ours(sysfs_root, device, entry.parent, entry.type_id):
            return Recovery.GONE
        group = SysfsTree(sysfs_root).link_name(device / "iommu_group")
        if group is not None and self._held(self._dev_root, group):
            log.warning(
                "the leftover temporary instance %s is in use (its VFIO group is open); "
                "left as it is, removed at a later start once free",
                uuid,
            )
            return Recovery.KEEP
        try:
            _write(SysfsTree(sysfs_root), device / "remove", "1")
        except InstanceError as err:
            log.error("cannot remove the leftover temporary instance %s: %s", uuid, err)
            return Recovery.KEEP
        log.warning("removed the temporary instance %s left by a daemon that died", uuid)
        return Recovery.UNDONE

    @staticmethod
    def _still_ours(sysfs_root: Path, device: Path, parent: str, type_id: str) -> bool:
        """Whether *device* is still what the record says (its type and parent); a record of an
        older version names neither and is taken as it is."""
        tree = SysfsTree(sysfs_root)
        found_type = tree.link_name(device / "mdev_type")
        real = tree.resolve(device)
        found_parent = real.parent.name if real is not None else None
        if (type_id and found_type != type_id) or (parent and found_parent != parent):
            log.warning(
                "the recorded temporary instance %s is now %s on %s, not %s on %s: it is not "
                "the one vfiocapsd created; left alone",
                device.name,
                found_type,
                found_parent,
                type_id,
                parent,
            )
            return False
        return True
