"""The cache's schema as an ordered list of migrations; ``PRAGMA user_version`` is the version."""

from __future__ import annotations

# Each entry upgrades the database from version i to i + 1. Entries are never edited once
# released: a change to the schema is a new entry at the end.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: capabilities keyed by driver, kernel, parent PCI id, type and QEMU binary identity
    (
        """
        CREATE TABLE capabilities (
            driver          TEXT    NOT NULL,
            driver_version  TEXT    NOT NULL,
            kernel_release  TEXT    NOT NULL,
            parent_pci_id   TEXT    NOT NULL,
            type_id         TEXT    NOT NULL,
            qemu_path       TEXT    NOT NULL,
            qemu_version    TEXT    NOT NULL,
            qemu_ctime_ns   INTEGER NOT NULL,
            outcome         TEXT    NOT NULL,
            display         TEXT    NOT NULL,
            gl_required     INTEGER NOT NULL,
            migration       TEXT    NOT NULL,
            blockers        TEXT    NOT NULL,
            error           TEXT    NOT NULL,
            probed_at_us    INTEGER NOT NULL,
            PRIMARY KEY (driver, driver_version, kernel_release, parent_pci_id, type_id,
                         qemu_path, qemu_version, qemu_ctime_ns)
        )
        """,
        "CREATE INDEX capabilities_by_driver ON capabilities (driver, driver_version)",
    ),
    # 2: migration notes, and failures cached with a retry time instead of forever
    (
        "ALTER TABLE capabilities ADD COLUMN notes TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE capabilities ADD COLUMN retry_at_us INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE capabilities ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
    ),
    # 3: bounded probe history, last known devices, and QEMU versions by binary identity
    (
        """
        CREATE TABLE probe_history (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            at_us           INTEGER NOT NULL,
            driver          TEXT    NOT NULL,
            driver_version  TEXT    NOT NULL,
            type_id         TEXT    NOT NULL,
            key_json        TEXT    NOT NULL,
            outcome         TEXT    NOT NULL,
            duration        REAL    NOT NULL,
            launches        INTEGER NOT NULL,
            error           TEXT    NOT NULL
        )
        """,
        """
        CREATE TABLE known_devices (
            device_id       TEXT    PRIMARY KEY,
            kind            TEXT    NOT NULL,
            sysfs_path      TEXT    NOT NULL,
            parent          TEXT    NOT NULL,
            type_id         TEXT    NOT NULL,
            driver          TEXT    NOT NULL,
            driver_version  TEXT    NOT NULL,
            last_seen_us    INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE qemu_binaries (
            path            TEXT    NOT NULL,
            ctime_ns        INTEGER NOT NULL,
            size            INTEGER NOT NULL,
            version         TEXT    NOT NULL,
            PRIMARY KEY (path, ctime_ns, size)
        )
        """,
    ),
    # 4: migration per configuration (QEMU's defaults, the device's options), proven by a round
    # trip, with the state size, save/load times, the kernel's flags and the conditions.
    # Until now "supported" meant "the state saved", possibly only with device options: those
    # answers are dropped so that the devices are probed again.
    (
        "ALTER TABLE capabilities ADD COLUMN migration_with_options TEXT NOT NULL "
        "DEFAULT 'unknown'",
        "ALTER TABLE capabilities ADD COLUMN migration_options TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE capabilities ADD COLUMN migration_state_bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE capabilities ADD COLUMN migration_save_seconds REAL NOT NULL DEFAULT 0",
        "ALTER TABLE capabilities ADD COLUMN migration_load_seconds REAL NOT NULL DEFAULT 0",
        "ALTER TABLE capabilities ADD COLUMN migration_flags TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE capabilities ADD COLUMN device_dirty_tracking INTEGER",
        "ALTER TABLE capabilities ADD COLUMN migration_conditions TEXT NOT NULL DEFAULT '[]'",
        "UPDATE capabilities SET migration_with_options = migration "
        "WHERE migration = 'unsupported'",
        "DELETE FROM capabilities WHERE outcome = 'ok' AND migration = 'supported'",
    ),
    # 5: whether the host gives a dma-buf display its OpenGL (a probe under egl-headless on a
    # render node), on which node, and the evidence. Answers that needed GL were cached before
    # the host was checked: they are dropped so that the devices are probed again.
    (
        "ALTER TABLE capabilities ADD COLUMN gl_host TEXT NOT NULL DEFAULT 'unknown'",
        "ALTER TABLE capabilities ADD COLUMN gl_render_node TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE capabilities ADD COLUMN gl_detail TEXT NOT NULL DEFAULT ''",
        "UPDATE capabilities SET gl_host = 'not-needed' WHERE outcome = 'ok' AND gl_required = 0",
        "DELETE FROM capabilities WHERE outcome = 'ok' AND gl_required = 1",
    ),
    # 6: the capabilities as one versioned JSON document (keyed by the attribute names of
    # vfiocaps.capabilities.Capabilities, see vfiocaps.capschema) beside real columns for the
    # key and the outcome; failures have no document, and neither has an answer whose lists were
    # not valid JSON (it is skipped when read, and probed again). Later fields need no migration: a
    # document without them loads with their defaults. QEMU binaries keep their vfio-pci
    # properties too.
    (
        """
        CREATE TABLE capability_records (
            driver            TEXT    NOT NULL,
            driver_version    TEXT    NOT NULL,
            kernel_release    TEXT    NOT NULL,
            parent_pci_id     TEXT    NOT NULL,
            type_id           TEXT    NOT NULL,
            qemu_path         TEXT    NOT NULL,
            qemu_version      TEXT    NOT NULL,
            qemu_ctime_ns     INTEGER NOT NULL,
            outcome           TEXT    NOT NULL,
            error             TEXT    NOT NULL,
            probed_at_us      INTEGER NOT NULL,
            retry_at_us       INTEGER NOT NULL,
            failures          INTEGER NOT NULL,
            document_version  INTEGER NOT NULL,
            document          TEXT,
            PRIMARY KEY (driver, driver_version, kernel_release, parent_pci_id, type_id,
                         qemu_path, qemu_version, qemu_ctime_ns)
        )
        """,
        """
        INSERT INTO capability_records
        SELECT driver, driver_version, kernel_release, parent_pci_id, type_id, qemu_path,
               qemu_version, qemu_ctime_ns, outcome, error, probed_at_us, retry_at_us, failures,
               1,
               CASE WHEN outcome = 'ok' AND json_valid(blockers) AND json_valid(notes)
                    AND json_valid(migration_options) AND json_valid(migration_flags)
                    AND json_valid(migration_conditions) THEN json_object(
                   'display', display,
                   'gl_required', json(CASE WHEN gl_required THEN 'true' ELSE 'false' END),
                   'migration', migration,
                   'migration_blockers', json(blockers),
                   'migration_notes', json(notes),
                   'qemu_version', qemu_version,
                   'migration_options', json(migration_options),
                   'migration_with_options', migration_with_options,
                   'migration_state_bytes', migration_state_bytes,
                   'migration_save_seconds', migration_save_seconds,
                   'migration_load_seconds', migration_load_seconds,
                   'migration_flags', json(migration_flags),
                   'device_dirty_tracking', json(CASE WHEN device_dirty_tracking IS NULL
                       THEN 'null' WHEN device_dirty_tracking THEN 'true' ELSE 'false' END),
                   'migration_conditions', json(migration_conditions),
                   'gl_host', gl_host,
                   'gl_render_node', gl_render_node,
                   'gl_detail', gl_detail
               ) END
        FROM capabilities
        """,
        "DROP TABLE capabilities",
        "ALTER TABLE capability_records RENAME TO capabilities",
        "CREATE INDEX capabilities_by_driver ON capabilities (driver, driver_version)",
        # What a warm start needs of the QEMU binary besides its version: its vfio-pci
        # properties (NULL for rows written before: read again once).
        "ALTER TABLE qemu_binaries ADD COLUMN vfio_pci_properties TEXT",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
