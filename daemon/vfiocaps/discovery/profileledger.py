"""The records of vGPU profiles set for probes, one file each under the runtime directory, so
that a profile a crash left behind is recognised and cleared at start."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..bootid import BOOT_ID_PATH, read_boot_id
from ..errors import DiscoveryError
from ..ids import is_pci_address
from ..statefile import OwnerLock, replace_file
from .functions import NO_PROFILE

log = logging.getLogger("vfiocaps.discovery")

# Records larger than this were not written by vfiocapsd.
RECORD_LIMIT = 4096


class ProfileError(DiscoveryError):
    """A vGPU profile could not be set on or cleared from a virtual function."""


@dataclass(frozen=True)
class ProfileRecord:
    """A profile vfiocapsd set on a virtual function and has not yet cleared."""

    function: str  # the VF's PCI address
    profile: str  # the id written to current_vgpu_type
    parent: str  # the physical function
    boot_id: str
    pid: str = "0"  # the vfiocapsd that set it ("0": not known, as in records of older versions)
    started: str = ""  # when that vfiocapsd started (see statefile.process_start; "": not known)
    # current_vgpu_type's modification time (ns) right after vfiocapsd set the profile ("": not
    # seen yet): a later write (an administrator setting a profile again) changes it.
    stamp: str = ""

    def valid(self) -> bool:
        return (
            is_pci_address(self.function)
            and is_pci_address(self.parent)
            and self.profile.isascii()
            and self.profile.isdigit()
            and self.profile != NO_PROFILE
            and len(self.profile) <= 9
            and 0 < len(self.boot_id) <= 64
            and self.pid.isascii()
            and self.pid.isdigit()
            and len(self.pid) <= 10
            and all(
                (value == "" or (value.isascii() and value.isdigit())) and len(value) <= 24
                for value in (self.started, self.stamp)
            )
        )


class ProfileLedger:
    """One file per profile set for a probe under *directory* (``<runtime>/profiles``),
    written before the profile is set and removed once it is cleared."""

    def __init__(self, directory: Path, boot_id_path: Path = BOOT_ID_PATH) -> None:
        self.directory = directory
        self._boot_id_path = boot_id_path
        self._owner = OwnerLock(directory)

    def boot_id(self) -> str:
        """This boot's id (see :func:`vfiocaps.bootid.read_boot_id`). Raises nothing."""
        return read_boot_id(self._boot_id_path)

    def _path(self, function: str) -> Path:
        return self.directory / f"{function}.json"

    def add(self, record: ProfileRecord, *, exclusive: bool = False) -> bool:
        """Record *record* durably (a new file renamed into place). With *exclusive*, only when
        its function has no record yet (the file is linked into place, which fails when one
        exists, in this process or another): return whether it was recorded.

        Raises:
            ProfileError: the record cannot be written; then nothing may be set.
        """
        path = self._path(record.function)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owner.hold()
            if not exclusive:
                replace_file(path, json.dumps(record.__dict__))
                return True
            staged = self.directory / f".{record.function}.{os.getpid()}.{id(record)}.new"
            replace_file(staged, json.dumps(record.__dict__))
            try:
                os.link(staged, path)
            except FileExistsError:
                return False
            finally:
                staged.unlink(missing_ok=True)
        except OSError as err:
            raise ProfileError(f"cannot record the profile in {self.directory}: {err}") from err
        return True

    def remove(self, function: str) -> None:
        """Forget the record of *function*. Raises nothing."""
        with contextlib.suppress(FileNotFoundError):
            self._path(function).unlink()

    def records(self) -> list[ProfileRecord]:
        """Every record; unreadable or malformed ones are logged and removed."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as err:
            log.error("profiles: cannot list %s: %s", self.directory, err.strerror)
            return []
        found = []
        for name in names:
            path = self.directory / name
            if not name.endswith(".json"):
                continue
            try:
                with path.open("rb") as stream:
                    data = stream.read(RECORD_LIMIT + 1)
                if len(data) > RECORD_LIMIT:
                    raise ValueError("too large")
                values = json.loads(data)
                optional = {"pid": "0", "started": "", "stamp": ""}
                fields = {
                    k: str(values[k] if k not in optional else values.get(k, optional[k]))
                    for k in ProfileRecord.__annotations__
                }
                record = ProfileRecord(**fields)
                if not record.valid() or name != f"{record.function}.json":
                    raise ValueError("fields out of range")
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.error("profiles: discarding unreadable record %s: %s", path, err)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            found.append(record)
        return found

    def owner_alive(self, record: ProfileRecord) -> bool:
        """Whether the vfiocapsd that wrote *record* still runs (see
        :meth:`vfiocaps.statefile.OwnerLock.alive`)."""
        return self._owner.alive(int(record.pid), record.started)

    def started(self) -> str:
        """This vfiocapsd's start time, for its records."""
        return self._owner.started()

    def functions(self) -> set[str]:
        """The virtual functions that carry a profile set for a probe."""
        return {record.function for record in self.records()}
