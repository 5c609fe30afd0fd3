"""Storage faults through the real daemon: a full disk, a read-only cache, a database overwritten.

The daemon runs in a private mount namespace (``unshare --mount``) with its cache directory on a
small tmpfs the test fills or remounts with ``nsenter``; the test reads the files through
``/proc/<pid>/root``. Throughout, the daemon must serve every device from memory and say how
its cache is (``Manager.CacheState``), and write everything once the fault clears.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.daemon_lab import Lab, capabilities, manager_property
from support.harness import DaemonProcess, wait_until
from support.reliability import daemon_pid, records

pytestmark = [
    pytest.mark.skipif(shutil.which("umockdev-wrapper") is None, reason="umockdev is missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root"),
]

RETRY = 15  # the daemon retries a failed write every 5 s


def start_on_tmpfs(lab: Lab, options: str) -> tuple[DaemonProcess, Path, int]:
    """Start the daemon with its cache on a tmpfs mounted with *options* in its own namespace."""
    cache = lab.directory / "cache"
    cache.mkdir(exist_ok=True)
    mount = f'mount -t tmpfs -o {options},mode=0755 vfiocaps-cache {cache} && exec "$@"'
    daemon = DaemonProcess(
        bus=lab.bus,
        workdir=lab.directory / "daemon",
        args=[  # its cache is the tmpfs
            *lab.daemon_args("--probe-retry-seconds", "600"),
            *lab.host.probe_env_args(),
        ],
        env=lab.host.daemon_env(),
        wrapper=[
            "unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh",
            *lab.host.daemon_wrapper(),
        ],
    )  # fmt: skip
    lab.daemons.append(daemon)
    daemon.start()
    wait_until(lambda: "event Resynchronised" in daemon.log(), 20, "the coldplug")
    pid = daemon_pid(daemon)
    return daemon, Path(f"/proc/{pid}/root{cache}"), pid


def stored(cache: Path) -> list[tuple[str, str, str]]:
    """The records in the daemon's database, read from a copy (SQLite resolves the
    ``/proc/<pid>/root`` link to a path in the test's own namespace, so it cannot open it)."""
    copy = Path(tempfile.mkdtemp(prefix="vfiocaps-copy-"))
    try:
        for suffix in ("", "-wal"):
            source = cache / f"capabilities.sqlite{suffix}"
            if source.exists():
                shutil.copyfile(source, copy / source.name)
        if not (copy / "capabilities.sqlite").exists():
            return []
        return records(copy / "capabilities.sqlite")
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def in_namespace(pid: int, *command: str) -> None:
    subprocess.run(["nsenter", "-t", str(pid), "-m", *command], check=True, timeout=10)


def cache_state(lab: Lab) -> str:
    return str(manager_property(lab.bus, "CacheState"))


def test_a_full_disk_degrades_to_memory_and_recovers(lab: Lab) -> None:
    lab.host.build("samples")
    daemon, cache, _ = start_on_tmpfs(lab, "size=1m")
    first = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({first: "done"})
    wait_until(lambda: len(stored(cache)) == 1, RETRY, "the first record")
    filler = cache / "filler"
    with filler.open("wb", buffering=0) as out:  # unbuffered: a short write leaves nothing to flush
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    uuids = [
        lab.host.add_instance(m, t) for m, t in [("mdpy", "mdpy-hd"), ("mbochs", "mbochs-small")]
    ]
    lab.wait_states(dict.fromkeys(uuids, "done"))
    wait_until(lambda: cache_state(lab).startswith("degraded"), RETRY, "CacheState degraded")
    assert "full" in cache_state(lab), cache_state(lab)
    assert capabilities(lab.bus, uuids[0])["Display"] == "region"
    assert capabilities(lab.bus, uuids[1])["Display"] == "dmabuf"
    filler.unlink()
    wait_until(lambda: cache_state(lab) == "ok", RETRY, "CacheState ok again")
    assert len(stored(cache)) == 3
    assert daemon.alive()


def test_a_read_only_cache_serves_from_memory_and_recovers_when_writable(lab: Lab) -> None:
    lab.host.build("mtty")
    daemon, cache, pid = start_on_tmpfs(lab, "size=4m,ro")
    assert cache_state(lab).startswith("degraded"), cache_state(lab)
    uuid = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({uuid: "done"})
    assert capabilities(lab.bus, uuid)["MigrationWithOptions"] == "supported"
    assert "cannot open" in cache_state(lab), cache_state(lab)
    assert not (cache / "capabilities.sqlite").exists()
    in_namespace(pid, "mount", "-o", "remount,rw", str(lab.directory / "cache"))
    wait_until(lambda: cache_state(lab) == "ok", RETRY, "CacheState ok once writable")
    assert stored(cache) == [("mtty", "mtty-1", "ok")]
    assert daemon.alive()


def test_a_database_replaced_by_random_bytes_while_running(lab: Lab) -> None:
    lab.host.build("samples")
    daemon, cache, _ = start_on_tmpfs(lab, "size=8m")
    first = lab.host.add_instance("mtty", "mtty-1")
    lab.wait_states({first: "done"})
    database = cache / "capabilities.sqlite"
    wait_until(lambda: len(stored(cache)) == 1, RETRY, "the first record")
    garbage = os.urandom(64 * 1024)
    (cache / "garbage").write_bytes(garbage)
    os.replace(cache / "garbage", database)
    second = lab.host.add_instance("mdpy", "mdpy-hd")
    lab.wait_states({second: "done"})
    assert capabilities(lab.bus, first)["MigrationWithOptions"] == "supported"

    def rebuilt() -> bool:
        try:
            return len(stored(cache)) == 2
        except sqlite3.DatabaseError:
            return False

    wait_until(rebuilt, RETRY, "the rebuilt database with both records")
    assert cache_state(lab) == "ok"
    (aside,) = cache.glob("capabilities.sqlite.corrupt-*[0-9]")
    assert aside.read_bytes() == garbage
    assert "replaced or removed while open" in daemon.log()
