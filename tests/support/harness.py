"""Real parts for black-box tests: a private dbus-daemon, the daemon process, CLI clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUS_NAME = "org.vfiocaps"
ROOT_PATH = "/org/vfiocaps"
REPO = Path(__file__).resolve().parent.parent.parent

SESSION_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
{extra}
</busconfig>
"""


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll *predicate* (a callable returning truthy) until it holds or *timeout* passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class PrivateBus:
    """A dbus-daemon of our own, listening on a socket in *directory*."""

    directory: Path
    extra_config: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.directory / "bus"

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self) -> PrivateBus:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "bus.conf"
        config.write_text(SESSION_CONFIG.format(socket=self.socket, extra=self.extra_config))
        self.process = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.socket.exists, 60, "the private bus socket")  # a bound, for loaded hosts
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def name_has_owner(self, name: str = BUS_NAME) -> bool:
        out = busctl(
            self.address,
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
            check=False,
        )
        return out.returncode == 0 and out.stdout.strip() == "b true"

    def unique_names_of(self, pid: int) -> list[str]:
        """The unique names of process *pid*'s connections to this bus, as the bus reports them:
        how a test reaches a daemon that does not own its well-known name (yet, or any more)."""

        def call(member: str, *args: str) -> Any:
            out = busctl(
                self.address, "--json=short", "call", "org.freedesktop.DBus",
                "/org/freedesktop/DBus", "org.freedesktop.DBus", member, *args, check=False,
            )  # fmt: skip
            return json.loads(out.stdout)["data"][0] if out.returncode == 0 else None

        names = [name for name in call("ListNames") or [] if name.startswith(":")]
        return [name for name in names if call("GetConnectionUnixProcessID", "s", name) == pid]

    def match_rules_of(self, pid: int) -> list[str]:
        """The match rules that process *pid*'s connections hold on this bus, as the bus itself
        reports them (``Debug.Stats``): a subscription is seen made, not guessed from a delay."""

        def call(interface: str, member: str, *args: str) -> Any:
            out = busctl(
                self.address, "--json=short", "call", "org.freedesktop.DBus",
                "/org/freedesktop/DBus", interface, member, *args, check=False,
            )  # fmt: skip
            return json.loads(out.stdout)["data"][0] if out.returncode == 0 else None

        rules = call("org.freedesktop.DBus.Debug.Stats", "GetAllMatchRules")
        found: list[str] = []
        for name, held in (rules or {}).items():
            # A connection may close between the two calls: then it holds nothing.
            if call("org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", name) == pid:
                found.extend(held)
        return found


def busctl(
    address: str, *args: str, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the real ``busctl`` against *address*; with *check*, a failure is an AssertionError
    that carries busctl's own message (the D-Bus error, or its timeout)."""
    done = subprocess.run(
        ["busctl", f"--address={address}", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"busctl {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()[:2000]}"
        )
    return done


def match_rules(address: str) -> int:
    """How many match rules the bus at *address* holds now (its Debug.Stats), for a test to
    wait until a subscriber has subscribed."""
    bus = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus.Debug.Stats")
    stats = busctl(address, "--json=short", "call", *bus, "GetStats")
    return int(json.loads(stats.stdout)["data"][0]["MatchRules"]["data"])


def gdbus(
    address: str, *args: str, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the real ``gdbus`` against *address* (``gdbus CMD --address A ...``)."""
    command, *rest = args
    return subprocess.run(
        ["gdbus", command, "--address", address, *rest],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


@dataclass
class DaemonProcess:
    """``vfiocapsd`` as a real subprocess, optionally under ``umockdev-wrapper``."""

    bus: PrivateBus
    workdir: Path
    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    wrapper: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "vfiocapsd.log"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    @property
    def runtime_dir(self) -> Path:
        return self.workdir / "run"

    def command(self) -> list[str]:
        return [
            *self.wrapper,
            sys.executable,
            "-m",
            "vfiocaps.daemon",
            "--bus-address",
            self.bus.address,
            "--cache-dir",
            str(self.cache_dir),
            "--runtime-dir",
            str(self.runtime_dir),
            *self.args,
        ]

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
        }
        env.update(self.env)
        return env

    def start(self, wait: bool = True, timeout: float = 90) -> DaemonProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=self.workdir,
        )
        log.close()
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 90) -> None:
        """Wait until the daemon owns its name (the bound is generous for loaded hosts)."""

        def serving() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"vfiocapsd exited with {self.process.returncode}:\n{self.log()}"
                )
            return self.bus.name_has_owner()

        wait_until(serving, timeout, "vfiocapsd to own org.vfiocaps", interval=0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send *sig* and return the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"vfiocapsd ignored signal {sig}:\n{self.log()}") from None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


DaemonFactory = Callable[..., DaemonProcess]
"""The ``start_daemon`` fixture: start vfiocapsd on a private bus with extra arguments."""


def raw_bus_connection(address: str) -> socket.socket:
    """A D-Bus connection by hand: authenticated, Hello sent, nothing read after that."""
    from dbus_fast import Message

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address.removeprefix("unix:path="))
    sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    assert sock.recv(4096).startswith(b"OK")
    sock.sendall(b"BEGIN\r\n")
    hello = Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="Hello",
        serial=1,
    )
    sock.sendall(hello._marshall(False))
    return sock


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
