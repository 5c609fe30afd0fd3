"""A device held open by a running VM is reported busy and the VM is never disturbed."""

from __future__ import annotations

from pathlib import Path

from labkit import DEVICE, Daemon, MdevLab, running_vm, wait_for

HELD_TYPE = "mdpy-xga"


def test_device_held_by_a_vm(
    daemon: Daemon, mdevs: MdevLab, samples: dict[str, str], tmp_path: Path
) -> None:
    daemon.systemctl("stop")
    try:
        mdev_uuid = mdevs.create("mdpy", HELD_TYPE)
        with running_vm(mdev_uuid, tmp_path / "vm") as (vm, qmp):
            daemon.systemctl("start")
            wait_for(daemon.is_serving, 120, "vfiocapsd to serve again")
            props = daemon.wait_settled(mdev_uuid)
            assert props["ProbeState"] == "busy", props
            path, _ = daemon.device_by_uuid(mdev_uuid) or (None, None)
            assert path is not None
            # Asked to refresh, the daemon either answers "busy" or refuses with an error that
            # names the device; it must not take the device from the VM either way.
            outcome = daemon.refresh_outcome(path)
            assert isinstance(outcome, dict) or mdev_uuid in outcome, outcome
            assert daemon.prop("ProbeState", path, DEVICE) == "busy"
            assert vm.poll() is None, "the VM died"
            assert qmp.execute("query-status")["status"] == "prelaunch"
            sysfsdev = qmp.execute("qom-get", path="/machine/peripheral/held", property="sysfsdev")
            assert mdev_uuid in sysfsdev
        daemon.call(path, DEVICE, "Refresh")
        props = daemon.wait_settled(mdev_uuid)
        assert props["ProbeState"] == "done", props
        assert props["Display"] == "region"
    finally:
        if not daemon.is_serving():
            daemon.systemctl("start")
