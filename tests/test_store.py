"""The SQLite cache: schema migrations from every older version, atomic writes, recovery."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from vfiocaps.capabilities import (
    Capabilities,
    Decider,
    Display,
    GlHost,
    Migration,
    MigrationCondition,
    ProbeOutcome,
)
from vfiocaps.qemubinary import QemuBinary
from vfiocaps.store import (
    CapabilityKey,
    CapabilityRecord,
    CapabilityStore,
    KnownDevice,
    ProbeHistoryEntry,
)
from vfiocaps.store.schema import SCHEMA_VERSION
from vfiocaps.store.sqlite import StoreUnavailableError

FIXTURES = Path(__file__).parent / "fixtures" / "store"


def key(type_id: str = "mtty-1", version: str = "0.1") -> CapabilityKey:
    return CapabilityKey(
        driver="mtty",
        driver_version=version,
        kernel_release="6.12.0",
        parent_pci_id="",
        type_id=type_id,
        qemu_path="/usr/bin/qemu-system-x86_64",
        qemu_version="10.0.3",
        qemu_ctime_ns=123,
    )


def record(k: CapabilityKey, display: Display = Display.NONE) -> CapabilityRecord:
    return CapabilityRecord(
        key=k,
        outcome=ProbeOutcome.OK,
        capabilities=Capabilities(
            display=display,
            gl_required=display is Display.DMABUF,
            migration=Migration.SUPPORTED,
            migration_blockers=(),
            migration_notes=("needs x-device-dirty-page-tracking=off",),
            qemu_version=k.qemu_version,
        ),
        error="",
        probed_at_us=1_700_000_000_000_000,
    )


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


async def test_fresh_database_has_current_schema_and_wal(tmp_path: Path) -> None:
    store = CapabilityStore(tmp_path / "c.sqlite")
    await store.open()
    await store.close()
    assert user_version(tmp_path / "c.sqlite") == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_there_is_a_fixture_for_every_older_schema() -> None:
    versions = sorted(int(p.stem.split("-v")[1]) for p in FIXTURES.glob("schema-v*.sql"))
    assert versions == list(range(1, SCHEMA_VERSION))


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_old_database_is_migrated_with_its_rows(tmp_path: Path, version: int) -> None:
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / f"schema-v{version}.sql").read_text())
    assert user_version(path) == version
    store = CapabilityStore(path)
    await store.open()
    try:
        records = {r.key.driver: r for r in await store.load_records()}
        # "supported" once meant "the state saved" (mtty only with device options), and a GL
        # answer once left the host unchecked (mbochs): such answers are dropped at the
        # upgrade, so that the devices are probed again.
        # The last schema with capabilities in columns also holds answers that survive the
        # move into the versioned document: every column must arrive in its field.
        assert set(records) == (
            {"mdpy", "nvidia"} | ({"mtty", "mbochs"} if version == 5 else set())
        )
        mdpy = records["mdpy"].capabilities
        assert mdpy is not None
        assert mdpy.display is Display.REGION
        assert mdpy.migration is Migration.UNSUPPORTED
        assert mdpy.migration_blockers == ("vfio 0000: VFIO migration is not supported in kernel",)
        assert mdpy.migration_with_options is Migration.UNSUPPORTED
        assert mdpy.migration_options == ()
        assert mdpy.migration_conditions == ()
        assert mdpy.device_dirty_tracking is None
        assert (mdpy.gl_host, mdpy.gl_render_node, mdpy.gl_detail) == (GlHost.NOT_NEEDED, "", "")
        assert records["nvidia"].outcome is ProbeOutcome.FAILED
        assert records["nvidia"].capabilities is None
        assert records["nvidia"].failures == (1 if version >= 2 else 0)
        assert await store.history() == []
        assert await store.known_devices() == []
    finally:
        await store.close()
    assert user_version(path) == SCHEMA_VERSION
    assert not list(tmp_path.glob("*.corrupt-*"))


async def test_records_round_trip_replace_and_delete(tmp_path: Path) -> None:
    store = CapabilityStore(tmp_path / "c.sqlite")
    await store.open()
    try:
        first, second = record(key("mtty-1")), record(key("mtty-2"), Display.DMABUF)
        await store.put_records([first, second])
        assert sorted(await store.load_records(), key=lambda r: r.key.type_id) == [first, second]
        failed = CapabilityRecord(
            key=first.key,
            outcome=ProbeOutcome.TIMEOUT,
            capabilities=None,
            error="no answer in 30 s",
            probed_at_us=5,
            retry_at_us=10,
            failures=2,
        )
        await store.put_records([failed])
        await store.delete_records([second.key])
        assert await store.load_records() == [failed]
    finally:
        await store.close()


async def test_migration_facts_round_trip(tmp_path: Path) -> None:
    caps = Capabilities(
        display=Display.NONE,
        gl_required=False,
        migration=Migration.UNSUPPORTED,
        migration_blockers=("ram_save_setup failed: Operation not supported",),
        migration_notes=("needs x-device-dirty-page-tracking=off",),
        qemu_version="10.0.3",
        migration_options=(("x-device-dirty-page-tracking", "off"), ("enable-migration", "on")),
        migration_with_options=Migration.SUPPORTED,
        migration_state_bytes=60,
        migration_save_seconds=0.21,
        migration_load_seconds=0.12,
        migration_flags=("stop-copy", "p2p", "pre-copy"),
        device_dirty_tracking=True,
        migration_conditions=(
            MigrationCondition("alone", Migration.SUPPORTED, Decider.QEMU, "saved and loaded"),
            MigrationCondition(
                "beside other VFIO devices", Migration.SUPPORTED, Decider.KERNEL, "P2P"
            ),
        ),
    )
    hidden = replace(caps, migration_flags=(), device_dirty_tracking=None)
    store = CapabilityStore(tmp_path / "c.sqlite")
    await store.open()
    try:
        first = replace(record(key("mtty-1")), capabilities=caps)
        second = replace(record(key("mtty-2")), capabilities=hidden)
        await store.put_records([first, second])
        loaded = sorted(await store.load_records(), key=lambda r: r.key.type_id)
        assert loaded == [first, second]
    finally:
        await store.close()


async def test_capability_columns_move_into_the_document(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / "schema-v5.sql").read_text())
    store = CapabilityStore(path)
    await store.open()
    try:
        records = {r.key.driver: r for r in await store.load_records()}
    finally:
        await store.close()
    mtty, mbochs = records["mtty"].capabilities, records["mbochs"].capabilities
    assert mtty == Capabilities(
        display=Display.NONE,
        gl_required=False,
        migration=Migration.UNSUPPORTED,
        migration_blockers=("ram_save_setup failed: Operation not supported",),
        migration_notes=("needs x-device-dirty-page-tracking=off",),
        qemu_version="10.0.3",
        migration_options=(("x-device-dirty-page-tracking", "off"),),
        migration_with_options=Migration.SUPPORTED,
        migration_state_bytes=60,
        migration_save_seconds=0.21,
        migration_load_seconds=0.12,
        migration_flags=("stop-copy", "p2p"),
        device_dirty_tracking=False,
        migration_conditions=(
            MigrationCondition("alone", Migration.SUPPORTED, Decider.QEMU, "saved and loaded"),
            MigrationCondition(
                "beside other VFIO devices", Migration.SUPPORTED, Decider.KERNEL, "P2P"
            ),
        ),
        gl_host=GlHost.NOT_NEEDED,
    )
    assert mbochs is not None
    assert (mbochs.display, mbochs.gl_required, mbochs.gl_host) == (
        Display.DMABUF,
        True,
        GlHost.SET_UP,
    )
    assert mbochs.gl_render_node == "/dev/dri/renderD128"
    assert records["mtty"].probed_at_us == 1731000000300000


async def test_an_old_row_with_broken_lists_costs_only_its_own_answer(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / "schema-v5.sql").read_text())
        db.execute("UPDATE capabilities SET blockers = '[not json' WHERE driver = 'mtty'")
    store = CapabilityStore(path)
    await store.open()
    try:
        records = {r.key.driver for r in await store.load_records()}
    finally:
        await store.close()
    assert records == {"mdpy", "nvidia", "mbochs"}
    assert user_version(path) == SCHEMA_VERSION
    assert not list(tmp_path.glob("*.corrupt-*"))


async def test_a_document_that_does_not_match_the_schema_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    store = CapabilityStore(path)
    await store.open()
    try:
        good, bad, newer = record(key("mtty-1")), record(key("mtty-2")), record(key("mtty-3"))
        await store.put_records([good, bad, newer])
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE capabilities SET document = json_set(document, '$.display', 'hologram') "
            "WHERE type_id = 'mtty-2'"
        )
        db.execute("UPDATE capabilities SET document_version = 99 WHERE type_id = 'mtty-3'")
    await store.open()
    try:
        assert await store.load_records() == [good]
    finally:
        await store.close()


def test_the_v4_fixture_holds_an_answer_that_needed_gl() -> None:
    # What the upgrade to GL answers drops must be in the fixture it is tested with.
    text = (FIXTURES / "schema-v4.sql").read_text()
    assert "'mbochs-small'" in text
    assert "'dmabuf',1," in text


@pytest.mark.parametrize(
    ("gl_host", "node", "detail"),
    [
        (GlHost.SET_UP, "/dev/dri/renderD128", "GL display set up on /dev/dri/renderD128: ..."),
        (GlHost.CRASHED, "/dev/dri/renderD129", "GL path crashed: QEMU ... SIGSEGV"),
        (GlHost.NO_RENDER_NODE, "", "no DRM render node in /dev/dri"),
        (GlHost.INACCESSIBLE, "/dev/dri/renderD128", "render node not accessible ..."),
    ],
)
async def test_gl_answers_round_trip(
    tmp_path: Path, gl_host: GlHost, node: str, detail: str
) -> None:
    caps = replace(
        record(key("mbochs-small"), Display.DMABUF).capabilities,  # type: ignore[arg-type]
        gl_host=gl_host,
        gl_render_node=node,
        gl_detail=detail,
    )
    stored = replace(record(key("mbochs-small")), capabilities=caps)
    store = CapabilityStore(tmp_path / "c.sqlite")
    await store.open()
    try:
        await store.put_records([stored])
        assert await store.load_records() == [stored]
    finally:
        await store.close()


async def test_history_is_bounded(tmp_path: Path) -> None:
    store = CapabilityStore(tmp_path / "c.sqlite", history_limit=10)
    await store.open()
    try:
        entries = [ProbeHistoryEntry(i, key(), ProbeOutcome.OK, 0.5, 1, "") for i in range(1, 26)]
        for start in range(0, 25, 5):
            await store.add_history(entries[start : start + 5])
        history = await store.history(100)
        assert [e.at_us for e in history] == list(range(25, 15, -1))
        assert history[0].key == key()
    finally:
        await store.close()


async def test_known_devices_and_qemu_versions(tmp_path: Path) -> None:
    store = CapabilityStore(tmp_path / "c.sqlite")
    await store.open()
    try:
        device = KnownDevice("uuid", "mdev", "/sys/x", "mtty", "mtty-1", "mtty", "0.1", 1)
        await store.replace_known_devices([device])
        await store.replace_known_devices([device])
        assert await store.known_devices() == [device]
        assert await store.qemu_binary("/q", 1, 2) is None
        await store.remember_qemu_binary(QemuBinary("/q", "10.0.3", 1, 2))
        newer = QemuBinary("/q", "10.1.0", 3, 2, frozenset({"sysfsdev", "display"}))
        await store.remember_qemu_binary(newer)
        assert await store.qemu_binary("/q", 1, 2) is None
        found = await store.qemu_binary("/q", 3, 2)
        assert found == newer
        assert found is not None
        assert found.vfio_pci_properties == newer.vfio_pci_properties
    finally:
        await store.close()


async def test_random_bytes_are_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    garbage = os.urandom(64 * 1024)
    path.write_bytes(garbage)
    store = CapabilityStore(path)
    await store.open()
    try:
        await store.put_records([record(key())])
        assert len(await store.load_records()) == 1
    finally:
        await store.close()
    (aside,) = tmp_path.glob("c.sqlite.corrupt-*")
    assert aside.read_bytes() == garbage
    assert user_version(path) == SCHEMA_VERSION


async def test_a_database_from_a_newer_daemon_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    store = CapabilityStore(path)
    await store.open()
    await store.close()
    assert user_version(path) == SCHEMA_VERSION
    assert len(list(tmp_path.glob("c.sqlite.corrupt-*"))) == 1


async def test_corruption_while_open_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    store = CapabilityStore(path)
    await store.open()
    try:
        await store.put_records([record(key())])
        await store.close()
        path.write_bytes(os.urandom(8192))
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        await store.open()
        assert await store.load_records() == []
        await store.put_records([record(key())])
        assert len(await store.load_records()) == 1
    finally:
        await store.close()


async def test_unopenable_directory_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = CapabilityStore(blocker / "sub" / "c.sqlite")
    with pytest.raises(StoreUnavailableError):
        await store.open()
    with pytest.raises(StoreUnavailableError):
        await store.load_records()


async def test_a_call_while_a_new_store_opens_waits_for_its_tables(tmp_path: Path) -> None:
    """The QEMU binary is asked while a new cache is created: what it stores must not meet a
    connection whose tables do not exist yet."""
    store = CapabilityStore(tmp_path / "c.sqlite")
    opening = asyncio.ensure_future(store.open())
    try:
        for _ in range(100_000):  # until the connection exists; its migration may not have run
            if store.is_open:
                break
            await asyncio.sleep(0)
        assert store.is_open
        binary = QemuBinary("/q", "10.0.3", 1, 2)
        await store.remember_qemu_binary(binary)
        await opening
        assert await store.qemu_binary("/q", 1, 2) == binary
    finally:
        await asyncio.gather(opening, return_exceptions=True)
        await store.close()
