"""The records of vGPU profiles set for probes, one file each under the runtime directory, so
that a profile a crash left behind is recognised and cleared at start."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bootid import BOOT_ID_PATH
from ..errors import DiscoveryError
from ..ids import is_pci_address
from ..ledger import Ledger, LedgerFormat
from ..statefile import OwnerLock
from .functions import NO_PROFILE

log = logging.getLogger("vfiocaps.discovery")


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

    @classmethod
    def from_value(cls, name: str, values: Any) -> ProfileRecord:
        """A record as read from a file (records of older versions name no pid, start time or
        stamp).

        Raises:
            KeyError, TypeError, ValueError, AttributeError: it is no such record.
        """
        optional = {"pid": "0", "started": "", "stamp": ""}
        return cls(
            **{
                k: str(values[k] if k not in optional else values.get(k, optional[k]))
                for k in cls.__annotations__
            }
        )


PROFILE_RECORDS: LedgerFormat[ProfileRecord] = LedgerFormat(
    what="profile record",
    name_of=lambda record: f"{record.function}.json",
    is_entry_name=lambda name: name.endswith(".json"),
    encode=lambda record: dict(record.__dict__),
    decode=ProfileRecord.from_value,
    valid=ProfileRecord.valid,
    boot_of=lambda record: record.boot_id,
)


class ProfileLedger:
    """One file per profile set for a probe under *directory* (``<runtime>/profiles``),
    written before the profile is set and removed once it is cleared."""

    def __init__(self, directory: Path, boot_id_path: Path = BOOT_ID_PATH) -> None:
        self.directory = directory
        self._ledger = Ledger(directory, PROFILE_RECORDS, boot_id_path)
        self._owner = OwnerLock(directory)

    def boot_id(self) -> str:
        """This boot's id (see :func:`vfiocaps.bootid.read_boot_id`). Raises nothing."""
        return self._ledger.boot_id()

    def add(self, record: ProfileRecord, *, exclusive: bool = False) -> bool:
        """Record *record* durably (a new file renamed into place). With *exclusive*, only when
        its function has no record yet (the file is linked into place, which fails when one
        exists, in this process or another): return whether it was recorded.

        Raises:
            ProfileError: the record cannot be written; then nothing may be set.
        """
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owner.hold()
            return self._ledger.add(record, exclusive=exclusive)
        except (OSError, ValueError) as err:
            raise ProfileError(f"cannot record the profile in {self.directory}: {err}") from err

    def remove(self, function: str) -> None:
        """Forget the record of *function*. Raises nothing."""
        self._ledger.discard(f"{function}.json")

    def records(self) -> list[ProfileRecord]:
        """Every record; unreadable or malformed ones are logged and removed."""
        return self._ledger.entries()

    def leftovers(self) -> list[ProfileRecord]:
        """The records an earlier vfiocapsd of this boot left (records of an earlier boot are
        dropped; those of a vfiocapsd still running are left to it)."""
        return self._ledger.leftovers(self._writer_running)

    def _writer_running(self, record: ProfileRecord) -> bool:
        owner = int(record.pid)
        if owner == os.getpid() or not self.owner_alive(record):
            return False
        log.info(
            "profiles: %s carries profile %s of the running vfiocapsd %d; left to it",
            record.function,
            record.profile,
            owner,
        )
        return True

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
