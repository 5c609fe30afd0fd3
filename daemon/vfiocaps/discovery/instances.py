"""Creating and removing mdev instances through sysfs, for probing types nobody instantiated."""

from __future__ import annotations

import json
import logging
import os
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

from ..bootid import BOOT_ID_PATH, read_boot_id, same_boot
from ..errors import DiscoveryError
from ..hostpaths import DEV_ROOT
from ..ids import is_mdev_uuid, name_problem
from ..model import Device, DeviceKind, Parent
from ..statefile import OwnerLock, replace_file
from ..vfiogroup import group_node, held_elsewhere
from .attributes import AttributeWriteError, write_attribute
from .sysfs import SysfsTree

log = logging.getLogger(__name__)

# Records larger than this were not written by vfiocapsd.
RECORD_LIMIT = 4096


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
    return str(uuidlib.uuid4())


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
        self._boot_id_path = boot_id_path
        self._owner = OwnerLock(directory)
        self._dev_root = dev_root
        self._held = held

    def _boot_id(self) -> str:
        return read_boot_id(self._boot_id_path)

    def record(self, uuid: str, parent: str = "", type_id: str = "") -> None:
        """Note that this daemon creates *uuid* (of *type_id* on *parent*), before it does.

        Raises:
            InstanceError: the record cannot be written (then the instance must not be made).
        """
        if not is_mdev_uuid(uuid):
            raise InstanceError(f"not an mdev UUID: {uuid[:80]!r}")
        text = json.dumps(
            {
                "boot_id": self._boot_id(),
                "pid": os.getpid(),
                "started": self._owner.started(),
                "uuid": uuid,
                "parent": parent,
                "type_id": type_id,
            }
        )
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owner.hold()
            replace_file(self.directory / uuid, text + "\n")
        except OSError as err:
            raise InstanceError(f"cannot record the temporary instance {uuid}: {err}") from err

    def forget(self, uuid: str) -> None:
        """The instance is gone: drop its record. Raises nothing."""
        if not is_mdev_uuid(uuid):
            return
        try:
            (self.directory / uuid).unlink(missing_ok=True)
        except OSError as err:
            log.warning("cannot drop the record of %s: %s", uuid, err)

    def recorded(self) -> list[str]:
        """UUIDs recorded now, by any daemon."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as err:
            log.warning("cannot read %s: %s", self.directory, err)
            return []
        return [name for name in names if is_mdev_uuid(name)]

    def remove_leftovers(self, sysfs_root: Path) -> list[str]:
        """Remove the instances recorded by dead daemons of this boot; return their UUIDs.

        Raises nothing: an instance that cannot be removed keeps its record for the next start.
        """
        boot_id = self._boot_id()
        removed = []
        for uuid in self.recorded():
            path = self.directory / uuid
            try:
                with path.open("rb") as stream:
                    entry = json.loads(stream.read(RECORD_LIMIT))
                owner_boot, pid = str(entry["boot_id"]), int(entry["pid"])
                started = str(entry.get("started", ""))
                parent, type_id = str(entry.get("parent", "")), str(entry.get("type_id", ""))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                log.warning("dropping the unreadable record %s: %s", path, err)
                self.forget(uuid)
                continue
            if not same_boot(owner_boot, boot_id):
                self.forget(uuid)
                continue
            if pid != os.getpid() and self._owner.alive(pid, started):
                continue
            device = sysfs_root / "bus" / "mdev" / "devices" / uuid
            if not os.path.lexists(device):
                self.forget(uuid)
                continue
            if not self._still_ours(sysfs_root, device, parent, type_id):
                self.forget(uuid)
                continue
            group = SysfsTree(sysfs_root).link_name(device / "iommu_group")
            if group is not None and self._held(self._dev_root, group):
                log.warning(
                    "the leftover temporary instance %s is in use (its VFIO group is open); "
                    "left as it is, removed at a later start once free",
                    uuid,
                )
                continue
            try:
                _write(SysfsTree(sysfs_root), device / "remove", "1")
            except InstanceError as err:
                log.error("cannot remove the leftover temporary instance %s: %s", uuid, err)
                continue
            log.warning("removed the temporary instance %s left by a daemon that died", uuid)
            self.forget(uuid)
            removed.append(uuid)
        return removed

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
