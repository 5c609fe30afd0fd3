"""The SQLite file behind the cache: open, migrate, recover, and read/write records atomically."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiosqlite

from ..capabilities import ProbeOutcome
from ..errors import StoreError
from ..qemubinary import QemuBinary
from .dbfile import DatabaseFile, StoreCorruptError, StoreUnavailableError
from .records import CapabilityKey, CapabilityRecord, KnownDevice, ProbeHistoryEntry
from .rows import DELETE_RECORD, SELECT_RECORDS, UPSERT_RECORD, record_to_row, row_to_record
from .schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)


def _classify(err: sqlite3.Error, action: str) -> StoreError:
    """Map an sqlite3 error to corrupt (rebuild) or unavailable (retry later)."""
    text = str(err)
    if isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.OperationalError):
        return StoreCorruptError(f"{action}: {text}")
    if "malformed" in text or "not a database" in text:
        return StoreCorruptError(f"{action}: {text}")
    return StoreUnavailableError(f"{action}: {text}")


def _property_names(stored: object) -> frozenset[str] | None:
    """The ``vfio-pci`` property names a row holds, or ``None`` when not asked yet or unreadable
    (they are asked again then)."""
    if not isinstance(stored, str):
        return None
    try:
        names = json.loads(stored)
    except ValueError:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None
    return frozenset(names)


class CapabilityStore:
    """One SQLite file of cached capabilities, probe history and known devices.

    Every write is one transaction, so a crash leaves either the old or the new rows, never a
    half-written record. A corrupt file is moved aside (``<name>.corrupt-<unix time>``) and a
    fresh database is created: the cache costs only probes to rebuild.
    """

    def __init__(self, path: Path, history_limit: int = 1000) -> None:
        self.path = path
        self.history_limit = history_limit
        self._db: aiosqlite.Connection | None = None
        self._file = DatabaseFile(path)
        self._lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        """Whether a database connection is open."""
        return self._db is not None

    async def open(self) -> None:
        """Open (creating, migrating or rebuilding) the database.

        Raises:
            StoreUnavailableError: the file or its directory cannot be created or opened at all.
        """
        # Under the lock: a read or write that comes meanwhile (the QEMU binary's, asked while
        # a new cache is created) waits for the migrated database instead of finding no table.
        async with self._lock:
            try:
                await self._open_checked()
            except StoreCorruptError as err:
                await self._close_quietly()
                self._file.move_aside(str(err))
                await self._open_checked()

    async def _open_checked(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreUnavailableError(f"cannot create {self.path.parent}: {err}") from err
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as err:
            raise _classify(err, f"cannot open {self.path}") from err
        self._db = db
        try:
            await db.execute("PRAGMA busy_timeout = 2000")
            cursor = await db.execute("PRAGMA quick_check")
            (verdict,) = await cursor.fetchone() or ("no answer",)
            if verdict != "ok":
                raise StoreCorruptError(f"{self.path} failed its integrity check: {verdict}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await self._migrate(db)
        except sqlite3.Error as err:
            raise _classify(err, f"cannot open {self.path}") from err
        self._file.opened()

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        cursor = await db.execute("PRAGMA user_version")
        row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreCorruptError(
                f"{self.path} has schema version {version}, newer than {SCHEMA_VERSION}"
            )
        if version == SCHEMA_VERSION:
            return
        # One script, one trip to the database's thread (a new cache runs every migration).
        steps = [
            s for target in range(version + 1, SCHEMA_VERSION + 1) for s in MIGRATIONS[target - 1]
        ]
        script = ";\n".join(
            ["BEGIN IMMEDIATE", *steps, f"PRAGMA user_version = {SCHEMA_VERSION}", "COMMIT"]
        )
        try:
            await db.executescript(script)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # none is open when BEGIN failed
                await db.execute("ROLLBACK")
            raise
        log.info("cache %s migrated from schema %d to %d", self.path, version, SCHEMA_VERSION)

    async def recover(self, reason: str) -> None:
        """Close, move the damaged file aside and start a fresh database.

        Raises:
            StoreUnavailableError: the fresh database cannot be created either.
        """
        async with self._lock:
            await self._close_quietly()
            if self.path.exists():
                self._file.move_aside(reason)
            await self._open_checked()

    async def close(self) -> None:
        """Close the database. Idempotent; never raises."""
        async with self._lock:
            await self._close_quietly()

    async def _close_quietly(self) -> None:
        db, self._db = self._db, None
        self._file.closed()
        if db is not None:
            try:
                await db.close()
            except sqlite3.Error as err:
                log.debug("closing %s: %s", self.path, err)

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailableError(f"{self.path} is not open")
        return self._db

    async def _read(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._lock:
            db = self._connection()
            try:
                cursor = await db.execute(sql, params)
                return list(await cursor.fetchall())
            except sqlite3.Error as err:
                raise _classify(err, action) from err

    async def _write(
        self, action: str, statements: Iterable[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        """Run each statement once per row of parameters, all in one transaction.

        Each statement goes to the database thread once, however many rows it has.
        """
        async with self._lock:
            db = self._connection()
            self._file.check_not_replaced(action)
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as err:
                raise _classify(err, action) from err
            try:
                for sql, rows in statements:
                    if rows:
                        await db.executemany(sql, rows)
                await db.execute("COMMIT")
            except BaseException as err:
                try:
                    await db.execute("ROLLBACK")
                except sqlite3.Error as rollback_err:
                    log.debug("rollback after failed %s: %s", action, rollback_err)
                if isinstance(err, sqlite3.Error):
                    raise _classify(err, action) from err
                raise

    async def load_records(self) -> list[CapabilityRecord]:
        """Every cached record.

        Raises:
            StoreCorruptError, StoreUnavailableError: the database cannot be read.
        """
        rows = await self._read("reading capabilities", SELECT_RECORDS)
        records = []
        for row in rows:
            try:
                records.append(row_to_record(row))
            except (ValueError, TypeError, KeyError) as err:
                log.warning("skipping an unreadable cache row: %s", err)
        return records

    async def put_records(self, records: Iterable[CapabilityRecord]) -> None:
        """Insert or replace *records* in one transaction.

        Raises:
            StoreCorruptError, StoreUnavailableError: nothing was written.
        """
        rows = [record_to_row(record) for record in records]
        await self._write("writing capabilities", [(UPSERT_RECORD, rows)])

    async def delete_records(self, keys: Iterable[CapabilityKey]) -> None:
        """Delete the records of *keys* in one transaction.

        Raises:
            StoreCorruptError, StoreUnavailableError: nothing was deleted.
        """
        rows = [tuple(asdict(key).values()) for key in keys]
        await self._write("deleting capabilities", [(DELETE_RECORD, rows)])

    async def add_history(self, entries: Iterable[ProbeHistoryEntry]) -> None:
        """Append probe history entries, keeping only the newest ``history_limit``.

        Raises:
            StoreCorruptError, StoreUnavailableError: nothing was written.
        """
        insert = (
            "INSERT INTO probe_history (at_us, driver, driver_version, type_id, key_json, "
            "outcome, duration, launches, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        rows = [
            (
                entry.at_us,
                entry.key.driver,
                entry.key.driver_version,
                entry.key.type_id,
                json.dumps(asdict(entry.key), sort_keys=True),
                entry.outcome.value,
                entry.duration,
                entry.launches,
                entry.error,
            )
            for entry in entries
        ]
        trim = (
            "DELETE FROM probe_history WHERE id <= "
            "(SELECT id FROM probe_history ORDER BY id DESC LIMIT 1 OFFSET ?)"
        )
        await self._write(
            "writing probe history", [(insert, rows), (trim, [(self.history_limit,)])]
        )

    async def history(self, limit: int = 100) -> list[ProbeHistoryEntry]:
        """The newest *limit* history entries, newest first.

        Raises:
            StoreCorruptError, StoreUnavailableError: the database cannot be read.
        """
        rows = await self._read(
            "reading probe history",
            "SELECT at_us, key_json, outcome, duration, launches, error FROM probe_history "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            ProbeHistoryEntry(
                at_us=at_us,
                key=CapabilityKey(**json.loads(key_json)),
                outcome=ProbeOutcome(outcome),
                duration=duration,
                launches=launches,
                error=error,
            )
            for at_us, key_json, outcome, duration, launches, error in rows
        ]

    async def replace_known_devices(self, devices: Iterable[KnownDevice]) -> None:
        """Replace the remembered device list in one transaction.

        Raises:
            StoreCorruptError, StoreUnavailableError: nothing was written.
        """
        insert = (
            "INSERT INTO known_devices (device_id, kind, sysfs_path, parent, type_id, driver, "
            "driver_version, last_seen_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        rows = [
            (
                device.device_id,
                device.kind,
                device.sysfs_path,
                device.parent,
                device.type_id,
                device.driver,
                device.driver_version,
                device.last_seen_us,
            )
            for device in devices
        ]
        await self._write(
            "writing known devices", [("DELETE FROM known_devices", [()]), (insert, rows)]
        )

    async def known_devices(self) -> list[KnownDevice]:
        """The remembered device list.

        Raises:
            StoreCorruptError, StoreUnavailableError: the database cannot be read.
        """
        rows = await self._read(
            "reading known devices",
            "SELECT device_id, kind, sysfs_path, parent, type_id, driver, driver_version, "
            "last_seen_us FROM known_devices ORDER BY device_id",
        )
        return [KnownDevice(*row) for row in rows]

    async def qemu_binary(self, path: str, ctime_ns: int, size: int) -> QemuBinary | None:
        """What a warm start needs of this exact binary: its version, with its ``vfio-pci``
        properties once a probe has asked them (else ``None`` there).

        Raises:
            StoreCorruptError, StoreUnavailableError: the database cannot be read.
        """
        rows = await self._read(
            "reading QEMU binaries",
            "SELECT version, vfio_pci_properties FROM qemu_binaries "
            "WHERE path = ? AND ctime_ns = ? AND size = ?",
            (path, ctime_ns, size),
        )
        if not rows:
            return None
        version, properties = rows[0]
        return QemuBinary(str(path), str(version), ctime_ns, size, _property_names(properties))

    async def remember_qemu_binary(self, binary: QemuBinary) -> None:
        """Remember *binary* for the next start (replacing older entries for its path).

        Raises:
            StoreCorruptError, StoreUnavailableError: nothing was written.
        """
        await self._write(
            "writing QEMU binary",
            [
                ("DELETE FROM qemu_binaries WHERE path = ?", [(binary.path,)]),
                (
                    "INSERT INTO qemu_binaries (path, ctime_ns, size, version, "
                    "vfio_pci_properties) VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            binary.path,
                            binary.ctime_ns,
                            binary.size,
                            binary.version,
                            None
                            if binary.vfio_pci_properties is None
                            else json.dumps(sorted(binary.vfio_pci_properties)),
                        )
                    ],
                ),
            ],
        )
