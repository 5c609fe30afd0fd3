"""The prober's single launches (the benchmarks' naive way) with the real launch code and the
fake QEMU (real QMP): one launch per question, the device's node lent and given back."""

from __future__ import annotations

import contextlib
import pwd
from pathlib import Path

from support.prober import (
    FakeHost,
    fake_host,
    fake_qemu_config,
    leftovers,
    node_state,
    probe_user,
    scratch,
)
from vfiocaps.prober import (
    DeviceSettings,
    OnOffAuto,
    Prober,
    ProbeTarget,
    ask_each,
    launch_credentials,
    probe_accel,
)

__all__ = ["fake_host", "probe_user", "scratch"]  # fixtures

DISPLAY = DeviceSettings(display=OnOffAuto.ON, migration=None)
MIGRATION = DeviceSettings(display=OnOffAuto.OFF, migration=OnOffAuto.ON)


async def test_each_question_is_one_launch_and_the_node_is_given_back(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    mdpy = fake_host.add_mdev("11111111-2222-4333-8444-000000000012", "mdpy-vga", "mdpy", "3")
    mtty = fake_host.add_mdev("11111111-2222-4333-8444-000000000011", "mtty-1", "mtty", "4")
    before = {group: node_state(fake_host.dev / "vfio" / group) for group in ("3", "4")}
    prober = Prober(fake_qemu_config(scratch, fake_host, probe_user))
    accel = probe_accel(prober)
    shown = await ask_each(prober, ProbeTarget.from_sysfs(mdpy, fake_host.sysfs), [DISPLAY], accel)
    quiet = await ask_each(
        prober, ProbeTarget.from_sysfs(mtty, fake_host.sysfs), [DISPLAY, MIGRATION], accel
    )
    assert [answer.started for answer in shown] == [True]  # mdpy has a display
    assert len(quiet) == 2
    assert quiet[0].started is False  # mtty has none: QEMU refuses display=on
    assert all(answer.seconds > 0 for answer in (*shown, *quiet))
    assert {group: node_state(fake_host.dev / "vfio" / group) for group in before} == before
    assert leftovers(scratch / "run") == []


def test_launch_credentials_are_the_probe_users(
    scratch: Path, fake_host: FakeHost, probe_user: str
) -> None:
    prober = Prober(fake_qemu_config(scratch, fake_host, probe_user))
    with contextlib.ExitStack() as stack:
        credentials = launch_credentials(prober, stack)
    assert credentials is not None
    assert credentials.uid == pwd.getpwnam(probe_user).pw_uid
