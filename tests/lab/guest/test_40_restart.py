"""After a restart the daemon serves every device from its cache, launching no QEMU."""

from __future__ import annotations

from labkit import Daemon, wait_for

KEPT = ("Display", "GlRequired", "Migration", "DriverVersion", "ProbedAt", "ProbeState")


def test_restart_needs_no_probe(daemon: Daemon, samples: dict[str, str]) -> None:
    for mdev_uuid in samples.values():
        daemon.wait_settled(mdev_uuid)
    wait_for(lambda: daemon.prop("Probing") is False, 120, "the daemon to finish probing")
    before = {props["Uuid"]: {k: props[k] for k in KEPT} for props in daemon.devices().values()}
    assert before
    daemon.restart()
    for mdev_uuid in before:
        daemon.wait_settled(mdev_uuid)
    after = {props["Uuid"]: {k: props[k] for k in KEPT} for props in daemon.devices().values()}
    assert after == before
    assert daemon.prop("ProbeCount") == 0
