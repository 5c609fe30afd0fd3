"""A caller's sysfs path is judged by its text before the root daemon looks at any file: one
answer for every refused path, whether it exists or not (no existence oracle for root's files)."""

from __future__ import annotations

from pathlib import Path

from support.harness import BUS_NAME, ROOT_PATH, DaemonFactory, PrivateBus, busctl


def refusal(bus: PrivateBus, path: str) -> str:
    result = busctl(
        bus.address, "call", BUS_NAME, ROOT_PATH, "org.vfiocaps1.Manager", "GetCapabilities",
        "s", path, check=False,
    )  # fmt: skip
    assert result.returncode != 0, path
    assert repr(path) in result.stderr, result.stderr
    return result.stderr.replace(repr(path), "PATH")


def test_refused_paths_all_get_one_answer(
    tmp_path: Path, private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "devices" / "virtual").mkdir(parents=True)
    secret = sysfs / "kernel" / "secret"
    secret.mkdir(parents=True, mode=0o700)
    (secret / "present").write_text("root's")
    (sysfs / "class" / "leak").mkdir(parents=True)
    (sysfs / "class" / "leak" / "out").symlink_to(secret / "present")
    start_daemon("--sysfs-root", str(sysfs))
    answers = {
        path: refusal(private_bus, path)
        for path in (
            f"{secret}/present",  # exists, outside the device tree
            f"{secret}/absent",  # does not exist, outside the device tree
            f"{sysfs}/devices/virtual/absent",  # does not exist, inside
            f"{sysfs}/devices/../kernel/secret/present",  # leaves the tree by its text
            f"{sysfs}/class/leak/out",  # a link leading out of the tree
            "/etc/passwd",
        )
    }
    assert len(set(answers.values())) == 1, answers
