"""The VFIO feature reader: ioctl encoding against the kernel header, decoding, and its process."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.prober import probe_user
from vfiocaps.prober import kernelfacts
from vfiocaps.prober import vfiofeatures as vf
from vfiocaps.prober.kernelfacts import parse_reader_output, read_kernel_facts, reader_argv
from vfiocaps.prober.sandbox import resolve_probe_identity

__all__ = ["probe_user"]  # fixture

HEADER = Path("/usr/include/linux/vfio.h")
C_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/vfio.h>
int main(void) {
    printf("VFIO_GET_API_VERSION %lu\n", (unsigned long)VFIO_GET_API_VERSION);
    printf("VFIO_CHECK_EXTENSION %lu\n", (unsigned long)VFIO_CHECK_EXTENSION);
    printf("VFIO_SET_IOMMU %lu\n", (unsigned long)VFIO_SET_IOMMU);
    printf("VFIO_GROUP_GET_STATUS %lu\n", (unsigned long)VFIO_GROUP_GET_STATUS);
    printf("VFIO_GROUP_SET_CONTAINER %lu\n", (unsigned long)VFIO_GROUP_SET_CONTAINER);
    printf("VFIO_GROUP_GET_DEVICE_FD %lu\n", (unsigned long)VFIO_GROUP_GET_DEVICE_FD);
    printf("VFIO_DEVICE_FEATURE %lu\n", (unsigned long)VFIO_DEVICE_FEATURE);
    printf("VFIO_TYPE1_IOMMU %lu\n", (unsigned long)VFIO_TYPE1_IOMMU);
    printf("VFIO_TYPE1v2_IOMMU %lu\n", (unsigned long)VFIO_TYPE1v2_IOMMU);
    printf("VFIO_API_VERSION %lu\n", (unsigned long)VFIO_API_VERSION);
    printf("VFIO_GROUP_FLAGS_VIABLE %lu\n", (unsigned long)VFIO_GROUP_FLAGS_VIABLE);
    printf("VFIO_DEVICE_FEATURE_MASK %lu\n", (unsigned long)VFIO_DEVICE_FEATURE_MASK);
    printf("VFIO_DEVICE_FEATURE_GET %lu\n", (unsigned long)VFIO_DEVICE_FEATURE_GET);
    printf("VFIO_DEVICE_FEATURE_SET %lu\n", (unsigned long)VFIO_DEVICE_FEATURE_SET);
    printf("VFIO_DEVICE_FEATURE_PROBE %lu\n", (unsigned long)VFIO_DEVICE_FEATURE_PROBE);
    printf("VFIO_DEVICE_FEATURE_MIGRATION %lu\n", (unsigned long)VFIO_DEVICE_FEATURE_MIGRATION);
    printf("VFIO_DEVICE_FEATURE_DMA_LOGGING_START %lu\n",
           (unsigned long)VFIO_DEVICE_FEATURE_DMA_LOGGING_START);
    printf("VFIO_MIGRATION_STOP_COPY %lu\n", (unsigned long)VFIO_MIGRATION_STOP_COPY);
    printf("VFIO_MIGRATION_P2P %lu\n", (unsigned long)VFIO_MIGRATION_P2P);
#ifdef VFIO_MIGRATION_PRE_COPY
    printf("VFIO_MIGRATION_PRE_COPY %lu\n", (unsigned long)VFIO_MIGRATION_PRE_COPY);
#endif
    printf("sizeof_group_status %zu\n", sizeof(struct vfio_group_status));
    printf("sizeof_device_feature %zu\n", sizeof(struct vfio_device_feature));
    printf("offsetof_feature_data %zu\n", offsetof(struct vfio_device_feature, data));
    printf("sizeof_feature_migration %zu\n", sizeof(struct vfio_device_feature_migration));
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_header(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """The values the C compiler computes from this machine's <linux/vfio.h>."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not HEADER.exists():
        pytest.skip("no C compiler or no <linux/vfio.h> (linux-libc-dev) here")
    directory = tmp_path_factory.mktemp("vfio-h")
    (directory / "values.c").write_text(C_PROGRAM)
    subprocess.run(
        [compiler, "-o", str(directory / "values"), str(directory / "values.c")], check=True
    )
    out = subprocess.run([str(directory / "values")], check=True, capture_output=True, text=True)
    return {name: int(value) for name, value in (line.split() for line in out.stdout.splitlines())}


def test_ioctl_numbers_equal_the_kernel_headers(kernel_header: dict[str, int]) -> None:
    for name in (
        "VFIO_GET_API_VERSION",
        "VFIO_CHECK_EXTENSION",
        "VFIO_SET_IOMMU",
        "VFIO_GROUP_GET_STATUS",
        "VFIO_GROUP_SET_CONTAINER",
        "VFIO_GROUP_GET_DEVICE_FD",
        "VFIO_DEVICE_FEATURE",
        "VFIO_TYPE1_IOMMU",
        "VFIO_TYPE1v2_IOMMU",
        "VFIO_API_VERSION",
        "VFIO_GROUP_FLAGS_VIABLE",
        "VFIO_DEVICE_FEATURE_MASK",
        "VFIO_DEVICE_FEATURE_GET",
        "VFIO_DEVICE_FEATURE_SET",
        "VFIO_DEVICE_FEATURE_PROBE",
        "VFIO_DEVICE_FEATURE_MIGRATION",
        "VFIO_DEVICE_FEATURE_DMA_LOGGING_START",
    ):
        assert getattr(vf, name) == kernel_header[name], name
    flags = dict((name, bit) for bit, name in vf.MIGRATION_FLAGS)
    assert flags["stop-copy"] == kernel_header["VFIO_MIGRATION_STOP_COPY"]
    assert flags["p2p"] == kernel_header["VFIO_MIGRATION_P2P"]
    if "VFIO_MIGRATION_PRE_COPY" in kernel_header:  # Linux 6.2 and later headers
        assert flags["pre-copy"] == kernel_header["VFIO_MIGRATION_PRE_COPY"]


def test_struct_layouts_equal_the_kernel_headers(kernel_header: dict[str, int]) -> None:
    assert vf.GROUP_STATUS.size == kernel_header["sizeof_group_status"]
    assert vf.FEATURE_HEADER.size == kernel_header["sizeof_device_feature"]
    assert vf.FEATURE_HEADER.size == kernel_header["offsetof_feature_data"]
    assert vf.FEATURE_MIGRATION.size == kernel_header["sizeof_feature_migration"]


def test_ioctl_numbers_by_hand() -> None:
    """_IO(';', 100 + n) is 0x3b00 + 100 + n: no direction, no size bits."""
    assert ord(";") == 0x3B
    assert vf.VFIO_GET_API_VERSION == 0x3B64
    assert vf.VFIO_CHECK_EXTENSION == 0x3B65
    assert vf.VFIO_SET_IOMMU == 0x3B66
    assert vf.VFIO_GROUP_GET_STATUS == 0x3B67
    assert vf.VFIO_GROUP_SET_CONTAINER == 0x3B68
    assert vf.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert vf.VFIO_DEVICE_FEATURE == 0x3B75


def test_requests_are_encoded_as_the_kernel_reads_them() -> None:
    assert bytes(vf.migration_request()) == struct.pack("<IIQ", 16, (1 << 16) | 1, 0)
    assert bytes(vf.dma_logging_probe_request()) == struct.pack("<II", 8, (1 << 18) | (1 << 17) | 6)
    assert bytes(vf.group_status_request()) == struct.pack("<II", 8, 0)
    reply = struct.pack("<IIQ", 16, (1 << 16) | 1, 0b111)
    assert vf.decode_migration_flags(reply) == (7, ["stop-copy", "p2p", "pre-copy"])
    assert vf.decode_migration_flags(struct.pack("<IIQ", 16, 0, 0b1)) == (1, ["stop-copy"])


class FakeKernel:
    """Answers the reader's ioctls the way drivers/vfio/vfio_main.c and group.c do.

    Used only because no VFIO device can exist on the test machine; the lab runs the reader
    on the kernel's mtty.
    """

    CONTAINER, GROUP, DEVICE = 10, 11, 12

    def __init__(
        self,
        *,
        migration_flags: int | None,
        log_ops: bool,
        open_error: int | None = None,
        viable: bool = True,
        device: str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
    ) -> None:
        self.migration_flags = migration_flags  # None: no mig_ops
        self.log_ops = log_ops
        self.open_error = open_error  # the vendor driver's open_device refusal
        self.viable = viable
        self.device = device
        self.container_set = False
        self.iommu = 0
        self.closed: list[int] = []
        self.calls: list[int] = []

    def open(self, path: str, flags: int) -> int:
        if path.endswith("/vfio/vfio"):
            return self.CONTAINER
        if path.endswith("/vfio/7"):
            return self.GROUP
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    def close(self, fd: int) -> None:
        self.closed.append(fd)

    def ioctl(self, fd: int, request: int, arg: Any, mutate: bool = True) -> int:
        self.calls.append(request)
        if fd == self.CONTAINER:
            return self._container(request, arg)
        if fd == self.GROUP:
            return self._group(request, arg)
        if fd == self.DEVICE and request == vf.VFIO_DEVICE_FEATURE:
            return self._feature(arg)
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def _container(self, request: int, arg: Any) -> int:
        if request == vf.VFIO_GET_API_VERSION:
            return vf.VFIO_API_VERSION
        if request == vf.VFIO_CHECK_EXTENSION:
            return 1 if arg in (vf.VFIO_TYPE1_IOMMU, vf.VFIO_TYPE1v2_IOMMU) else 0
        if request == vf.VFIO_SET_IOMMU:
            if not self.container_set:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            self.iommu = int(arg)
            return 0
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def _group(self, request: int, arg: Any) -> int:
        if request == vf.VFIO_GROUP_GET_STATUS:
            argsz, _ = struct.unpack_from("=II", arg)
            assert argsz == 8
            struct.pack_into("=II", arg, 0, argsz, vf.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0)
            return 0
        if request == vf.VFIO_GROUP_SET_CONTAINER:
            (container,) = struct.unpack("=i", bytes(arg))
            assert container == self.CONTAINER
            self.container_set = True
            return 0
        if request == vf.VFIO_GROUP_GET_DEVICE_FD:
            if not self.iommu:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            name = bytes(arg).split(b"\0", 1)[0].decode()
            if name != self.device:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
            if self.open_error is not None:
                raise OSError(self.open_error, os.strerror(self.open_error))
            return self.DEVICE
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def _feature(self, arg: bytearray) -> int:
        argsz, flags = struct.unpack_from("=II", arg)
        feature = flags & vf.VFIO_DEVICE_FEATURE_MASK
        ops = flags & (vf.VFIO_DEVICE_FEATURE_GET | vf.VFIO_DEVICE_FEATURE_SET)
        if feature == vf.VFIO_DEVICE_FEATURE_MIGRATION:
            if self.migration_flags is None:
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
            self._check(flags, argsz, ops, vf.VFIO_DEVICE_FEATURE_GET, 8)
            struct.pack_into("=Q", arg, 8, self.migration_flags)
            return 0
        if feature == vf.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
            if not self.log_ops:
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
            if flags & vf.VFIO_DEVICE_FEATURE_PROBE and not ops & ~vf.VFIO_DEVICE_FEATURE_SET:
                return 0
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    @staticmethod
    def _check(flags: int, argsz: int, ops: int, supported: int, minsz: int) -> None:
        if ops & ~supported or argsz - 8 < minsz:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def read(kernel: FakeKernel) -> dict[str, Any]:
    return vf.read_features(
        "/dev/vfio/vfio",
        "/dev/vfio/7",
        "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
        ioctl=kernel.ioctl,
        opener=kernel.open,
        closer=kernel.close,
    )


def test_mtty_on_linux_6_12_reports_its_three_flags_and_dma_logging() -> None:
    """samples/vfio-mdev/mtty.c (v6.7 and later): STOP_COPY | P2P | PRE_COPY, and log_ops."""
    kernel = FakeKernel(migration_flags=0b111, log_ops=True)
    assert read(kernel) == {
        "observable": True,
        "migration": True,
        "flags": ["stop-copy", "p2p", "pre-copy"],
        "raw_flags": 7,
        "dirty_tracking": True,
    }
    assert kernel.iommu == vf.VFIO_TYPE1v2_IOMMU
    assert sorted(kernel.closed) == [kernel.CONTAINER, kernel.GROUP, kernel.DEVICE]


def test_a_device_without_migration_ops_reports_none() -> None:
    kernel = FakeKernel(migration_flags=None, log_ops=False)
    answer = read(kernel)
    assert answer == {
        "observable": True,
        "migration": False,
        "flags": [],
        "raw_flags": 0,
        "dirty_tracking": False,
    }


def test_a_vendor_that_refuses_the_open_is_not_observable() -> None:
    kernel = FakeKernel(migration_flags=0b11, log_ops=True, open_error=errno.EIO)
    with pytest.raises(vf.NotObservable, match="VFIO_GROUP_GET_DEVICE_FD: Input/output error"):
        read(kernel)
    assert sorted(kernel.closed) == [kernel.CONTAINER, kernel.GROUP]


def test_a_group_that_is_not_viable_is_not_observable() -> None:
    with pytest.raises(vf.NotObservable, match="not viable"):
        read(FakeKernel(migration_flags=1, log_ops=False, viable=False))


def test_the_reader_runs_isolated_and_answers_not_observable_without_vfio(tmp_path: Path) -> None:
    """The real program against this machine's kernel: there is no VFIO container here."""
    argv = reader_argv(tmp_path / "vfio" / "vfio", tmp_path / "vfio" / "7", "dev")
    assert argv[:3] == (sys.executable, "-I", "-S")
    out = subprocess.run(argv, capture_output=True, text=True, env={}, check=False, timeout=30)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["observable"] is False
    assert "cannot open the VFIO container" in answer["reason"]
    assert "No such file or directory" in answer["reason"]


async def test_the_daemon_runs_the_reader_as_the_probe_user(
    tmp_path: Path, probe_user: str
) -> None:
    identity = resolve_probe_identity(probe_user)
    (tmp_path / "vfio").mkdir()
    container = tmp_path / "vfio" / "vfio"
    container.write_text("")
    container.chmod(0o600)  # root's: the probe user must not get in
    tmp_path.chmod(0o755)
    facts = await read_kernel_facts(tmp_path, tmp_path / "vfio" / "7", "dev", identity.credentials)
    assert facts.observable is False
    expected = "Permission denied" if identity.credentials is not None else "VFIO"
    assert expected in facts.reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "gave no answer"),
        ("not json", "gave no answer"),
        ('{"observable": false}', "not observable"),
        ('{"observable": true, "flags": ["stop-copy", "warp"]}', "unknown migration flags"),
    ],
)
def test_malformed_reader_output_is_not_observable(text: str, reason: str) -> None:
    facts = parse_reader_output(text)
    assert facts.observable is False
    assert reason in facts.reason


def test_reader_output_becomes_facts() -> None:
    facts = parse_reader_output(
        '{"observable": true, "migration": true, "flags": ["stop-copy", "p2p", "pre-copy"], '
        '"raw_flags": 7, "dirty_tracking": true}\n'
    )
    assert facts.observable
    assert facts.flags == ("stop-copy", "p2p", "pre-copy")
    assert facts.dirty_tracking is True


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--container", "/dev/vfio/vfio", "--group", "/dev/vfio/7"],
        ["--container", "a", "--container", "b", "--device", "c"],
        ["--container", "a", "--group", "b", "--device", "c", "--extra", "d"],
    ],
)
def test_bad_arguments_are_refused_with_the_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert vf.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "answer",
    [
        {"observable": True, "migration": True, "flags": ["stop-copy", "p2p"], "raw_flags": 3,
         "dirty_tracking": False},
        {"observable": False, "reason": 'cannot open "a\\b"\n\t\x01\x7f é ✓ /dev/vfio/7'},
        {"observable": True, "migration": False, "flags": [], "raw_flags": 0},
    ],
)  # fmt: skip
def test_the_readers_json_is_what_json_reads(answer: dict[str, Any]) -> None:
    assert json.loads(vf.to_json(answer)) == answer


def test_the_reader_starts_without_typing_json_or_re(tmp_path: Path) -> None:
    """It runs once per probe: every module it imports is paid for by every probe."""
    argv = reader_argv(tmp_path / "vfio" / "vfio", tmp_path / "vfio" / "7", "dev")
    out = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        capture_output=True, text=True, env={}, check=False, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert not imported & {"typing", "json", "re", "enum", "collections"}, sorted(imported)
    assert json.loads(out.stdout)["observable"] is False


def _children_of_this_process() -> list[int]:
    """The pids whose parent is this process (zombies included), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                children.append(int(entry.name))
    return children


async def test_the_reader_is_a_forked_child_that_keeps_none_of_the_daemons_descriptors(
    tmp_path: Path,
) -> None:
    """The daemon's descriptors (its bus connection, its database) are closed in the reader
    before it touches a device: a descriptor the daemon holds is no path the reader can open."""
    held = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dev_root = tmp_path / "dev"
        (dev_root / "vfio").mkdir(parents=True)
        (dev_root / "vfio" / "vfio").symlink_to(f"/proc/self/fd/{held}")
        before = _children_of_this_process()
        facts = await read_kernel_facts(dev_root, tmp_path / "group", "dev", None)
    finally:
        os.close(held)
    assert facts.observable is False
    assert "cannot open the VFIO container" in facts.reason
    assert "No such file or directory" in facts.reason
    assert _children_of_this_process() == before, "the reader was not reaped"


async def test_a_reader_past_its_time_limit_is_killed_and_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernelfacts, "READER_TIME_LIMIT", 0.0)
    before = _children_of_this_process()
    facts = await read_kernel_facts(tmp_path, tmp_path / "vfio" / "7", "dev", None)
    assert facts.observable is False
    assert facts.reason == "the VFIO feature reader gave no answer in 0 s"
    assert _children_of_this_process() == before


async def test_a_cancelled_read_kills_and_reaps_the_reader(tmp_path: Path) -> None:
    before = _children_of_this_process()
    task = asyncio.ensure_future(read_kernel_facts(tmp_path, tmp_path / "vfio" / "7", "dev", None))
    await asyncio.sleep(0)  # forked, now waiting for its end
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _children_of_this_process() == before
