"""What a person meets first: the quick start's line to copy, one-line errors for any input, the
end of ``monitor``, the options and exit codes of both programs, and who may change state."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.cli_help import commands_of, help_text
from support.harness import REPO, DaemonFactory, PrivateBus, match_rules, wait_until

NOBODY = 65534
AUTHORITY = REPO / "tests" / "support" / "polkit_authority.py"
# Every exit status vfiocapsctl documents, and vfiocapsd's.
CTL_EXITS = {0, 1, 2, 3, 4, 5, 6, 7, 8, 130}
DAEMON_EXITS = {0, 1, 2}
CTL = [sys.executable, "-m", "vfiocaps.ctl"]
DAEMON = [sys.executable, "-m", "vfiocaps.daemon"]


def run(
    argv: list[str | bytes], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        argv, capture_output=True, timeout=60, check=False, env={**base, **(env or {})}
    )


def one_line_error(result: subprocess.CompletedProcess[bytes], program: str) -> str:
    """The program's stderr, checked to be short, prefixed and free of any traceback."""
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line and not line.startswith("usage:")]
    assert all(line.startswith((f"{program}: ", " ")) for line in lines), err
    return err


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path lies under a root-only one)."""
    path = Path(tempfile.mkdtemp(prefix="vfiocaps-ctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- 1. the quick start prints one line to copy ------------------------------------------------


def test_the_quick_start_prints_a_vfiocapsctl_line_that_works_when_copied() -> None:
    base = Path(tempfile.mkdtemp(prefix="vfiocaps-quickstart-ctl-"))
    base.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "VFIOCAPS_VENV": str(Path(sys.executable).parent.parent),
        "VFIOCAPS_QUICKSTART_DIR": str(base / "quick start"),  # a space: quoted in the line
        "XDG_RUNTIME_DIR": str(base),
    }
    script = subprocess.Popen(
        [str(REPO / "scripts" / "run-daemon")], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert script.stderr is not None
        said: list[str] = []
        while not any("try: " in line for line in said):
            line = script.stderr.readline()
            assert line, "".join(said)
            said.append(line)
        copied = next(line for line in said if "try: " in line).split("try: ", 1)[1].strip()
        assert copied.endswith(" status")

        def works() -> bool:
            done = subprocess.run(["sh", "-c", copied], capture_output=True, text=True, timeout=30)
            return done.returncode == 0 and "DeviceCount" in done.stdout

        wait_until(works, 30, "the copied vfiocapsctl line to answer", interval=0.3)
    finally:
        os.killpg(script.pid, signal.SIGTERM)
        script.communicate(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


# -- 2. one line, never a traceback -------------------------------------------------------------


def test_arguments_that_are_not_utf8_get_one_line(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    address = f"--bus-address={private_bus.address}"
    for argv in (
        [b"show", b"/sys/devices/\xff"],
        [b"invalidate", b"\xff"],
        [b"xml", b"\xc3(", b"--viewer", b"remote"],
        [b"migration", b"check", b"-", b"--device", b"\xfe"],
    ):
        result = run([*CTL, address, *argv])
        err = one_line_error(result, "vfiocapsctl")
        assert result.returncode == 2, err
        assert "not valid UTF-8" in err
        assert err.count("\n") == 1


def test_control_characters_in_arguments_are_shown_escaped_on_one_line(tmp_path: Path) -> None:
    """A newline or an escape in a word argparse rejects is written as its escape: the error
    stays one line and moves no cursor (both programs parse with vfiocaps.cmdline)."""
    dirs = ["--cache-dir", str(tmp_path / "cache"), "--runtime-dir", str(tmp_path / "run")]
    for program, argv in (
        ("vfiocapsctl", [*CTL, "--bus-address", "unix:path=/nonexistent", "status", "\n\x01"]),
        ("vfiocapsctl", [*CTL, "--timeout", "\x1b[2J"]),
        ("vfiocapsd", [*DAEMON, *dirs, "\n\x01"]),
        ("vfiocapsd", [*DAEMON, *dirs, "--probe-timeout", "\x1b]0;x\x07"]),
    ):
        result = run(argv)
        err = one_line_error(result, program)
        assert result.returncode == 2, err
        assert not {"\x1b", "\x01", "\x07"} & set(err), err
        message = [line for line in err.splitlines() if line.startswith(f"{program}: ")]
        assert len(message) == 1, err
        assert "\\n" in message[0] or "\\x1b" in message[0], err


def test_a_missing_or_malformed_bus_address_is_one_line_in_both_programs(tmp_path: Path) -> None:
    dirs = ["--cache-dir", str(tmp_path / "cache"), "--runtime-dir", str(tmp_path / "run")]
    cases: list[tuple[list[str | bytes], dict[str, str]]] = [
        (["--session", "status"], {}),  # no DBUS_SESSION_BUS_ADDRESS
        (["status"], {"DBUS_SYSTEM_BUS_ADDRESS": "garbage"}),
        (["--session", "status"], {"DBUS_SESSION_BUS_ADDRESS": "unix:nonsense=1"}),
        (["--bus-address", "x:", "status"], {}),
    ]
    for argv, env in cases:
        result = run([*CTL, *argv], env)
        err = one_line_error(result, "vfiocapsctl")
        assert result.returncode == 3, err
        assert err.count("\n") == 1
        assert "bus" in err
        daemon = run([*DAEMON, *[a for a in argv if a != "status"], *dirs], env)
        assert daemon.returncode == 1, daemon.stderr
        assert b"Traceback" not in daemon.stderr
        assert b"--bus-address" in daemon.stderr or b"cannot connect" in daemon.stderr


CTL_WORDS = [
    "status", "list", "types", "show", "xml", "refresh", "invalidate", "monitor", "probe-type",
    "migration", "fingerprint", "check", "probe", "--json", "--viewer", "local", "remote",
    "--timeout", "--session", "--system", "--bus-address", "--no-ask-password", "--device", "-",
    "--sysfs-root", "--runtime-dir", "--probe-user", "--version", "--help",
]  # fmt: skip
ARGUMENT = st.one_of(st.sampled_from(CTL_WORDS), st.binary(min_size=0, max_size=12).filter(
    lambda raw: b"\0" not in raw))  # fmt: skip
ENVIRONMENT = st.fixed_dictionaries(
    {},
    optional={
        "DBUS_SESSION_BUS_ADDRESS": st.sampled_from(["", "garbage", "unix:path=/nonexistent",
                                                     "unix:abstract=", "tcp:host=,port=x"]),
        "DBUS_SYSTEM_BUS_ADDRESS": st.sampled_from(["", "garbage", "unix:path=/nonexistent"]),
        "LANG": st.sampled_from(["C", "C.UTF-8", "xx_XX.bogus"]),
        "COLUMNS": st.sampled_from(["0", "-5", "abc", "20"]),
    },
)  # fmt: skip


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=st.lists(ARGUMENT, max_size=6), env=ENVIRONMENT)
def test_any_command_line_gets_a_documented_exit_and_no_traceback(
    private_bus: PrivateBus, start_daemon: DaemonFactory, argv: list[str | bytes],
    env: dict[str, str],
) -> None:  # fmt: skip
    if not private_bus.name_has_owner():
        start_daemon()
    # The daemon's bus first; a later --bus-address, --session or --system in argv may override.
    words = [w for w in argv if w not in (b"probe", "probe")]  # a probe would run QEMU here
    result = run([*CTL, f"--bus-address={private_bus.address}", *words], env)
    one_line_error(result, "vfiocapsctl")
    assert result.returncode in CTL_EXITS, result


DAEMON_WORDS = [
    "--session", "--system", "--bus-address", "--sysfs-root", "--probe-timeout", "--probe-env",
    "--probe-concurrency", "--nfd-labels", "--authorization-timeout", "--version", "-v", "x:",
]  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    argv=st.lists(st.one_of(st.sampled_from(DAEMON_WORDS), st.binary(max_size=10).filter(
        lambda raw: b"\0" not in raw)), max_size=5),
    env=ENVIRONMENT,
)  # fmt: skip
def test_any_daemon_command_line_gets_a_documented_exit_and_no_traceback(
    argv: list[str | bytes], env: dict[str, str]
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        # Never the real buses: a dead address first, state in a scratch directory.
        fixed = ["--bus-address", "unix:path=/nonexistent/bus", "--cache-dir", f"{scratch}/c",
                 "--runtime-dir", f"{scratch}/r", "--sysfs-root", f"{scratch}/sys"]  # fmt: skip
        result = run([*DAEMON, *fixed, *argv], env)
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert result.returncode in DAEMON_EXITS, err


# -- 3. monitor ends with its bus, and on Ctrl-C ------------------------------------------------


def _monitor(bus: PrivateBus) -> subprocess.Popen[str]:
    """``vfiocapsctl monitor``, once it has subscribed (its match rule is on the bus)."""
    before = match_rules(bus.address)
    process = subprocess.Popen(
        [*CTL, "--bus-address", bus.address, "monitor"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: match_rules(bus.address) > before, 30, "monitor's match rule")
    return process


def test_monitor_ends_with_a_message_when_the_bus_goes(
    private_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    daemon = start_daemon()
    monitor = _monitor(private_bus)
    daemon.stop()
    private_bus.stop()
    started = time.monotonic()
    _out, err = monitor.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert monitor.returncode == 3, err
    assert err.startswith("vfiocapsctl: the bus went away"), err
    assert err.count("\n") == 1, err


def test_monitor_on_ctrl_c_is_130(private_bus: PrivateBus, start_daemon: DaemonFactory) -> None:
    start_daemon()
    monitor = _monitor(private_bus)
    monitor.send_signal(signal.SIGINT)
    _out, err = monitor.communicate(timeout=20)
    assert monitor.returncode == 130, err
    assert "Traceback" not in err


# -- 6. commands and options --------------------------------------------------------------------


def test_every_option_of_both_programs_has_help_and_says_its_default() -> None:
    pages = {"vfiocapsd": [help_text("vfiocapsd")], "vfiocapsctl": [help_text("vfiocapsctl")]}
    ctl_top = pages["vfiocapsctl"][0]
    for command in commands_of(ctl_top):
        pages["vfiocapsctl"].append(help_text("vfiocapsctl", command))
    pages["vfiocapsctl"] += [help_text("vfiocapsctl", "migration", verb)
                             for verb in ("fingerprint", "check")]  # fmt: skip
    assert "probe-type" in commands_of(ctl_top)
    for program, texts in pages.items():
        for text in texts:
            options = text.split("options:\n", 1)[1].split("\n\n")[0]
            entries = re.split(r"\n(?=  -)", options.strip("\n"))
            for entry in entries:
                if entry.lstrip().startswith(("-h, --help", "--help")):
                    continue
                name, _, said = entry.strip().partition("  ")
                assert said.strip() or "\n" in entry, f"{program}: {name} has no help"
                takes_value = bool(re.match(r"-[-\w]+[ =][A-Z\[]", entry.strip()))
                if takes_value:
                    assert "default" in entry or "off unless" in entry, f"{program}: {entry}"


def test_version_timeout_and_probe_type(lab: object) -> None:
    from support.daemon_lab import Lab, vfiocapsctl

    assert isinstance(lab, Lab)
    version = run([*CTL, "--version"])
    assert version.returncode == 0
    assert version.stdout.startswith(b"vfiocapsctl ")
    for bad in ("0", "-1", "nan", "inf", "soon"):
        refused = run([*CTL, "--timeout", bad, "status"])
        err = one_line_error(refused, "vfiocapsctl")
        assert refused.returncode == 2, err
        assert "--timeout" in err, err
    lab.host.build("samples")
    lab.start()
    mtty = lab.host.add_instance("mtty", "mtty-2")
    lab.wait_states({mtty: "done"})
    probed = vfiocapsctl(lab.bus, "probe-type", "mtty", "mtty-2")  # cached: nothing created
    assert probed.returncode == 0, probed.stderr
    assert re.search(r"^MigrationWithOptions +supported$", probed.stdout, re.M), probed.stdout
    unknown = vfiocapsctl(lab.bus, "probe-type", "mtty", "mtty-9")
    assert unknown.returncode == 5, unknown.stderr
    assert unknown.stderr.startswith("vfiocapsctl: ")
    listed = vfiocapsctl(lab.bus, "list").stdout
    assert re.search(rf"^{mtty} .* supported with options$", listed, re.M), listed
    types = vfiocapsctl(lab.bus, "types").stdout
    assert max(len(line) for line in types.splitlines()) <= 100, types
    assert re.search(r"^mdev +mtty +mtty-2 .* supported\*$", types, re.M), types
    assert types.splitlines()[-1].startswith("supported*: supported with options"), types


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_probe_says_what_is_wrong_and_as_a_user_to_run_it_as_root(scratch: Path) -> None:
    tmp_path = scratch
    pci = tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:02.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x8086\n")
    # A PCI function bound to no VFIO driver: a usage error.
    result = run([*CTL, "probe", "0000:00:02.0", "--sysfs-root", str(tmp_path / "sys"),
                  "--runtime-dir", str(tmp_path / "run")])  # fmt: skip
    err = one_line_error(result, "vfiocapsctl")
    assert result.returncode == 2, err
    assert "not a VFIO device" in err
    # As a user, /run/vfiocaps is root's: run it as root (nothing is to be deleted).
    tmp_path.chmod(0o755)
    for path in tmp_path.rglob("*"):
        path.chmod(0o755)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    result = run([*as_nobody, *CTL, "probe", "0000:00:02.0", "--sysfs-root",
                  str(tmp_path / "sys")])  # fmt: skip
    err = one_line_error(result, "vfiocapsctl")
    assert result.returncode == 6, err
    assert "as root (sudo)" in err
    assert "remove it" not in err


# -- 7. who may change state, and polkit's password prompt --------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="calls as another user need root")
def test_a_user_who_may_not_is_told_why_and_what_to_do(scratch: Path) -> None:
    # The quick start's bus admits only its owner: another user hears why, not an empty text.
    bus = PrivateBus(scratch / "own").start()
    (scratch / "own").chmod(0o755)
    bus.socket.chmod(0o777)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    try:
        result = run([*as_nobody, *CTL, "--bus-address", bus.address, "status"])
        err = one_line_error(result, "vfiocapsctl")
        assert result.returncode == 3
        assert "admits only the user who started it" in err, err
        assert "sudo" in err, err
    finally:
        bus.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="calls as another user need root")
def test_from_a_terminal_polkit_may_ask_for_a_password_unless_told_not_to(
    shared_bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    admin = pwd.getpwnam("daemon").pw_uid  # the authority says yes to this user at once
    log = shared_bus.directory / "polkit-events"
    authority = subprocess.Popen(
        [sys.executable, str(AUTHORITY), "serve", shared_bus.address, str(admin), str(log)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert authority.stdout is not None
        assert authority.stdout.readline().strip() == "ready"
        start_daemon(bus=shared_bus)
        as_admin = ["setpriv", f"--reuid={admin}", f"--regid={admin}", "--clear-groups"]
        invalidate = [*as_admin, *CTL, "--bus-address", shared_bus.address, "invalidate", "mtty"]
        quiet = [*invalidate[:-2], "--no-ask-password", *invalidate[-2:]]

        def in_a_terminal(argv: list[str]) -> list[str | bytes]:
            return ["script", "-qec", shlex.join(argv), "/dev/null"]

        # The authority also stands for the system bus's polkit that pkttyagent registers with.
        system_bus = {"DBUS_SYSTEM_BUS_ADDRESS": shared_bus.address}
        for argv, asked in (
            (invalidate, False),  # no terminal: nobody could answer a prompt
            (in_a_terminal(invalidate), True),
            (in_a_terminal(quiet), False),
        ):
            before = len(log.read_text().splitlines()) if log.exists() else 0
            result = run(list(argv), env=system_bus)
            assert result.returncode == 0, result
            events = [json.loads(line) for line in log.read_text().splitlines()[before:]]
            checks = [event for event in events if event["event"] == "check"]
            assert checks[-1]["action"] == "org.vfiocaps.invalidate"
            assert checks[-1]["flags"] == (1 if asked else 0), (argv, checks[-1])
            # As systemctl does, a text agent is there to ask before the call is made, and
            # only when polkit may ask.
            agents = [i for i, event in enumerate(events) if event["event"] == "agent"]
            assert bool(agents) == asked, (argv, events)
            if asked:
                assert agents[0] < events.index(checks[-1]), events
    finally:
        authority.terminate()
        authority.wait(10)
