"""Migration round trips against the fake QEMU: save, load into -incoming defer, bounded stream."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from support.harness import REPO
from support.prober import (
    REAL_QEMU,
    FakeHost,
    fake_host,
    leftovers,
    probe_user,
    probe_with_fake_qemu,
    scratch,
)
from vfiocaps.capabilities import Migration, ProbeOutcome
from vfiocaps.config import (
    DEFAULT_MIGRATION_STREAM_LIMIT,
    MAX_MIGRATION_STREAM_LIMIT,
    Config,
)
from vfiocaps.daemon import build_parser, config_from_args
from vfiocaps.errors import ConfigError
from vfiocaps.prober import LaunchEvent, LaunchStage
from vfiocaps.prober.launch import LaunchContext, probe_environment, run_launch
from vfiocaps.prober.observation import Attempt, LaunchEnd, Step
from vfiocaps.prober.plan import Accel, DeviceSettings, OnOffAuto
from vfiocaps.prober.sandbox import private_directory, resolve_probe_identity
from vfiocaps.prober.stream import STREAM_FILE

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

MTTY = "22222222-2222-4333-8444-000000000001"
NVIDIA = "22222222-2222-4333-8444-000000000005"
UNLOADABLE = "22222222-2222-4333-8444-000000000009"


class StreamWatcher:
    """Looks at the probe's stream file when each launch starts and ends."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.seen: list[tuple[str, str, tuple[int, int] | None]] = []

    def __call__(self, event: LaunchEvent) -> None:
        if event.stage is LaunchStage.QMP_READY:
            return
        found = sorted(self.runtime_dir.glob(f"probe-*/{STREAM_FILE}"))
        modes = None
        if found:
            directory_mode = stat.S_IMODE(found[0].parent.stat().st_mode)
            modes = (directory_mode, stat.S_IMODE(found[0].stat().st_mode))
        self.seen.append((event.purpose, event.stage.value, modes))


async def test_mtty_round_trip_keeps_the_stream_private_and_only_until_the_load(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(MTTY, "mtty-1", "mtty", "0")
    watcher = StreamWatcher(scratch / "run")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device, observer=watcher)
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert (caps.migration, caps.migration_with_options) == (
        Migration.UNSUPPORTED,
        Migration.SUPPORTED,
    )
    assert caps.migration_state_bytes == 60
    assert caps.migration_save_seconds > 0
    assert caps.migration_load_seconds > 0
    assert watcher.seen == [
        ("discover", "started", None),
        ("discover", "ended", None),  # the failed save kept nothing
        ("tracking-off", "started", None),
        ("tracking-off", "ended", (0o700, 0o600)),  # kept, private, for the load
        ("load", "started", (0o700, 0o600)),
        ("load", "ended", None),  # deleted right after the load
    ]
    load = report.launches[-1].argv
    assert load[load.index("-incoming") + 1] == "defer"
    assert "x-device-dirty-page-tracking=off" in load[load.index("-device") + 1]


async def test_the_destination_leaves_the_device_out_of_resuming_before_it_quits(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    # A destination that quits paused leaves the device in RESUMING for its next user; Linux
    # 6.12's mtty then oopses on the next state change (a second probe, a VM start).
    device = fake_host.add_mdev(MTTY, "mtty-1", "mtty", "0")
    qmp_log = scratch / "qmp.log"
    qmp_log.touch(mode=0o666)
    qmp_log.chmod(0o666)
    report = await probe_with_fake_qemu(
        scratch, fake_host, probe_user, device, {"qmp_log": str(qmp_log)}
    )
    assert report.outcome is ProbeOutcome.OK, report
    commands = [json.loads(line) for line in qmp_log.read_text().splitlines()]
    load = commands[max(i for i, c in enumerate(commands) if c["execute"] == "migrate-incoming") :]
    names = [command["execute"] for command in load]
    assert names[-3:] == ["cont", "stop", "quit"], names
    assert load[-3]["resuming"] is True  # loaded, still RESUMING before cont
    assert load[-1]["resuming"] is False  # out of it when QEMU quits
    assert load[-1]["status"] == "paused"


async def test_a_state_that_saves_but_does_not_load_is_unsupported(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(UNLOADABLE, "nvidia-63", "nvidia-vgpu-vfio", "3", "nvidia")
    overrides = {"devices": {UNLOADABLE: {"profile": "saves-not-loads"}}}
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device, overrides)
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert caps.migration is Migration.UNSUPPORTED
    assert caps.migration_with_options is Migration.UNSUPPORTED
    (blocker,) = caps.migration_blockers
    assert blocker.startswith("the saved state does not load: ")
    assert "load of migration failed: Invalid argument" in blocker
    assert caps.migration_state_bytes == 1024
    assert [launch.purpose for launch in report.launches] == ["discover", "load"]
    assert report.launches[-1].exit_status == 1


async def test_a_state_past_the_limit_is_cancelled_not_proven_and_not_kept(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(NVIDIA, "nvidia-63", "nvidia-vgpu-vfio", "4", "nvidia")
    limit = 1 << 20  # the fake's NVIDIA state is 4 MiB
    report = await probe_with_fake_qemu(
        scratch, fake_host, probe_user, device, migration_stream_limit=limit
    )
    assert report.outcome is ProbeOutcome.OK, report
    caps = report.capabilities
    assert caps is not None
    assert caps.migration is Migration.UNKNOWN
    assert any(f"state larger than {limit} bytes: not proven" in n for n in caps.migration_notes)
    assert [launch.purpose for launch in report.launches] == ["discover"]


async def test_nvidia_round_trips_with_qemus_defaults(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    device = fake_host.add_mdev(NVIDIA, "nvidia-63", "nvidia-vgpu-vfio", "4", "nvidia")
    report = await probe_with_fake_qemu(scratch, fake_host, probe_user, device)
    caps = report.capabilities
    assert caps is not None
    assert caps.migration is Migration.SUPPORTED
    assert caps.migration_options == ()
    assert caps.migration_state_bytes == 4 * 1024 * 1024
    assert len(report.launches) == 2


@pytest.mark.skipif(REAL_QEMU is None, reason="qemu-system-x86_64 is not installed")
async def test_real_qemu_saves_into_the_bounded_stream_and_loads_it_into_incoming_defer(
    scratch: Path, probe_user: str
) -> None:
    """The round trip's QMP plumbing against the real QEMU, on a VM without a device."""
    identity = resolve_probe_identity(probe_user)
    settings = DeviceSettings(display=OnOffAuto.OFF, migration=None)
    with private_directory(scratch / "run") as workdir:
        context = LaunchContext(
            binary=Path(REAL_QEMU or "/usr/bin/qemu-system-x86_64"),
            machine="q35",
            vm_uuid="33333333-2222-4333-8444-000000000001",
            sysfsdev=None,
            identity=identity,
            workdir=workdir,
            timeout=30.0,
            environment=probe_environment(),
        )
        saved, _ = await run_launch(context, Attempt(Step.DISCOVER, settings, Accel.TCG))
        assert saved.end is LaunchEnd.QUIT, saved
        result = saved.migration
        assert result is not None
        assert (result.status, result.stream_kept, result.limit_exceeded) == (
            "completed",
            True,
            False,
        )
        assert result.stream_bytes is not None
        assert (workdir / STREAM_FILE).stat().st_size == result.stream_bytes
        loaded, record = await run_launch(context, Attempt(Step.LOAD, settings, Accel.TCG))
        assert loaded.end is LaunchEnd.QUIT, loaded
        assert record.argv[record.argv.index("-incoming") + 1] == "defer"
        incoming = loaded.incoming
        assert incoming is not None
        # The source never ran: the destination takes its runstate from the stream.
        assert incoming.status == "completed", incoming
        assert incoming.runstate in ("paused", "prelaunch"), incoming
        assert incoming.duration > 0
        assert not (workdir / STREAM_FILE).exists()
        small = replace(context, stream_limit=4096)
        capped, _ = await run_launch(small, Attempt(Step.DISCOVER, settings, Accel.TCG))
        assert capped.migration is not None
        assert capped.migration.limit_exceeded
        assert capped.migration.status in ("cancelled", "failed")
        assert not (workdir / STREAM_FILE).exists()
    assert leftovers(scratch / "run") == []


def test_the_stream_limit_is_a_bounded_option() -> None:
    args = build_parser().parse_args(["--migration-stream-limit", "1048576"])
    assert config_from_args(args, {}).migration_stream_limit == 1 << 20
    default = config_from_args(build_parser().parse_args([]), {})
    assert default.migration_stream_limit == DEFAULT_MIGRATION_STREAM_LIMIT
    for bad in (0, -1, MAX_MIGRATION_STREAM_LIMIT + 1):
        with pytest.raises(ConfigError, match="migration stream limit"):
            Config(migration_stream_limit=bad)


def test_the_units_memory_limit_leaves_room_for_the_streams_of_concurrent_probes() -> None:
    unit = (REPO / "systemd" / "vfiocapsd.service.in").read_text()
    (line,) = [line for line in unit.splitlines() if line.startswith("MemoryMax=")]
    value = line.split("=", 1)[1]
    assert value.endswith("M")
    memory_max = int(value[:-1]) * 1024 * 1024
    streams = Config().probe_concurrency * DEFAULT_MIGRATION_STREAM_LIMIT
    assert memory_max >= streams + 512 * 1024 * 1024  # QEMUs and the daemon beside them
