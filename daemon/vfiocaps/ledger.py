"""Crash ledgers: one file per entry, written before a change a crash could leave behind, removed
once it is undone; the one reader, writer and recovery loop of every ledger of the daemon.

Every ledger (lent device nodes, vGPU profiles set for probes, temporary mdev instances) keeps
the same rules for its files:

* An entry is one file in the ledger's directory (``0700``, created when missing), named by
  the entry itself (:attr:`LedgerFormat.name_of`), holding one JSON object, written by
  :func:`vfiocaps.statefile.replace_at` (a crash leaves the old entry or the new one).
* Names starting with ``.`` (files being written) and names the format does not claim (owner
  and lock files) are not entries and are left alone.
* An entry is read only from a regular file owned by the daemon's user, opened without
  following a link, at most :data:`ENTRY_LIMIT` bytes, that parses and validates as an entry
  of the format and is in the file its name says. Anything else (corrupt, foreign, planted) is
  refused with a log line and its name removed: it is never followed and never acted upon.
* Recovery (:meth:`Ledger.recover`) drops the entries of another boot (what they recorded went
  with it), leaves those of a writer still running to it, and hands each other one to an undo
  callback, which says whether it is undone, gone, or to be kept for a later start.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from .bootid import read_boot_id, same_boot
from .hostpaths import BOOT_ID_PATH
from .statefile import replace_file

log = logging.getLogger(__name__)

# Entries larger than this were not written by vfiocapsd.
ENTRY_LIMIT = 4096

T = TypeVar("T")


class Recovery(enum.Enum):
    """What undoing a leftover entry came to."""

    UNDONE = "undone"  # the change was undone: the entry goes, and is reported
    GONE = "gone"  # nothing is left to undo (or must not be): the entry goes
    KEEP = "keep"  # not undone now: the entry stays for a later start


@dataclass(frozen=True)
class LedgerFormat(Generic[T]):
    """How one ledger's entries look on disk."""

    what: str  # what an entry is, for log lines ("grant record")
    name_of: Callable[[T], str]  # the file name of an entry
    is_entry_name: Callable[[str], bool]  # which names in the directory are entries
    encode: Callable[[T], Any]  # an entry as a JSON value
    # A JSON value, read from the file of that name, as an entry; raises ValueError, KeyError
    # or TypeError for anything else.
    decode: Callable[[str, Any], T]
    valid: Callable[[T], bool]  # whether a decoded entry's values are in range
    boot_of: Callable[[T], str]  # the boot id an entry was written in


class Ledger(Generic[T]):
    """The entries of format *form* in *directory*, of the boot whose id *boot_id_path* holds."""

    def __init__(
        self, directory: Path, form: LedgerFormat[T], boot_id_path: Path = BOOT_ID_PATH
    ) -> None:
        self.directory = directory
        self.form = form
        self._boot_id_path = boot_id_path

    def boot_id(self) -> str:
        """This boot's id (see :func:`vfiocaps.bootid.read_boot_id`). Raises nothing."""
        return read_boot_id(self._boot_id_path)

    def path_of(self, entry: T) -> Path:
        """The file of *entry*."""
        return self.directory / self.form.name_of(entry)

    def add(self, entry: T, *, exclusive: bool = False) -> bool:
        """Write *entry* durably, replacing an entry of the same name. With *exclusive*, only
        when there is none yet (the file is linked into place, which fails when one exists, in
        this process or another): return whether it was written.

        Raises:
            OSError: the entry cannot be written (then the change must not be made).
            ValueError: *entry* is not valid for this ledger (nothing is written).
        """
        if not self.form.valid(entry):
            raise ValueError(f"not a valid {self.form.what}: {entry!r}")
        name = self.form.name_of(entry)
        text = json.dumps(self.form.encode(entry))
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not exclusive:
            replace_file(self.directory / name, text)
            return True
        staged = self.directory / f".{name}.{os.getpid()}.{id(entry)}.new"
        replace_file(staged, text)
        try:
            os.link(staged, self.directory / name)
        except FileExistsError:
            return False
        finally:
            staged.unlink(missing_ok=True)
        return True

    def remove(self, entry: T) -> None:
        """Drop *entry* (its change is undone or gone). Raises nothing: a failure is logged."""
        self.discard(self.form.name_of(entry))

    def discard(self, name: str) -> None:
        """Drop the entry in the file *name*, if the format claims that name. Raises nothing:
        a failure is logged."""
        if "/" in name or name.startswith(".") or not self.form.is_entry_name(name):
            return
        try:
            (self.directory / name).unlink(missing_ok=True)
        except OSError as err:
            log.warning("cannot drop the %s %s: %s", self.form.what, self.directory / name, err)

    def names(self) -> list[str]:
        """The names of the entries' files now, sorted (without reading them). Raises nothing."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as err:
            log.error("cannot list the %ss in %s: %s", self.form.what, self.directory, err)
            return []
        return [
            name for name in names if not name.startswith(".") and self.form.is_entry_name(name)
        ]

    def entries(self) -> list[T]:
        """Every entry, in the order of their names; those that cannot be read as entries of
        this ledger are logged and removed. Raises nothing."""
        found = []
        for name in self.names():
            try:
                found.append(self._read(name))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                log.error(
                    "refusing the %s %s (%s); removed, nothing it names is touched",
                    self.form.what,
                    self.directory / name,
                    err,
                )
                self.discard(name)
        return found

    def _read(self, name: str) -> T:
        """The entry in the file *name*.

        Raises:
            FileNotFoundError: it is gone.
            OSError, ValueError, KeyError, TypeError, AttributeError: it is no entry of ours.
        """
        fd = os.open(self.directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ValueError("not a regular file of the daemon's user")
            data = os.read(fd, ENTRY_LIMIT + 1)
        finally:
            os.close(fd)
        if len(data) > ENTRY_LIMIT:
            raise ValueError(f"larger than {ENTRY_LIMIT} bytes")
        entry = self.form.decode(name, json.loads(data))
        if not self.form.valid(entry):
            raise ValueError("values out of range")
        if self.form.name_of(entry) != name:
            raise ValueError("the entry belongs in another file")
        return entry

    def leftovers(self, alive: Callable[[T], bool]) -> list[T]:
        """The entries dead writers of this boot left: entries of another boot are dropped
        (what they recorded went with that boot), those whose writer is *alive* left to it.
        Raises nothing."""
        boot_id = self.boot_id()
        found = []
        for entry in self.entries():
            if not same_boot(self.form.boot_of(entry), boot_id):
                log.info("dropping a %s of another boot: %s", self.form.what, self.path_of(entry))
                self.remove(entry)
            elif not alive(entry):
                found.append(entry)
        return found

    def recover(self, alive: Callable[[T], bool], undo: Callable[[T], Recovery]) -> list[T]:
        """Undo what dead writers of this boot left (:meth:`leftovers`); return the entries
        undone. Each leftover goes to *undo* and is dropped unless it says
        :attr:`Recovery.KEEP`. Raises what *undo* raises (it should raise nothing)."""
        undone = []
        for entry in self.leftovers(alive):
            outcome = undo(entry)
            if outcome is Recovery.KEEP:
                continue
            self.remove(entry)
            if outcome is Recovery.UNDONE:
                undone.append(entry)
        return undone
