"""The floor of the daemon's start on a systemd host (the lab guest): ``name_floor.py`` started by
systemd as a plain transient service, with the daemon's interpreter and its dbus-fast, timed until
it owns the daemon's name; a floor that ends before owning the name fails at once, with its log.

The daemon's launcher (``scripts/write-launchers``) runs the system's Python isolated (``-I``)
with the package's private module directory first on ``sys.path``; a service does not inherit the
caller's ``PYTHONPATH``. So the floor is started with the interpreter and options of the
launcher's ``#!`` line, and given the directory the running benchmark's dbus-fast comes from:
the same interpreter, the same library, the same bus and a name, and nothing of the daemon.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import dbus_fast
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from bench import name_floor
from bench.name_timing import BUS_DAEMON, seconds_to_name

SYSTEMCTL_TIMEOUT = 120.0
POLL_S = 0.5
# systemctl's exit status for a unit that is not loaded: a --collect unit that ended is gone.
NOT_LOADED = 5
RUNNING_STATES = frozenset({"active", "activating", "reloading"})


def launcher_interpreter(launcher: Path) -> list[str]:
    """The interpreter and its options on *launcher*'s ``#!`` line (the daemon's program).

    Raises:
        RuntimeError: *launcher* does not start with ``#!``.
        OSError: *launcher* cannot be read.
    """
    with launcher.open("rb") as script:
        first = script.readline(512)
    if not first.startswith(b"#!") or not first[2:].split():
        raise RuntimeError(f"{launcher} has no #! line: cannot start the floor the same way")
    return first[2:].decode().split()


def library_dir() -> Path:
    """The directory this process imports dbus-fast from (the package's private directory when
    run as the lab does, with ``PYTHONPATH=...:/usr/share/vfiocaps``)."""
    return Path(dbus_fast.__file__).resolve().parent.parent


def floor_command(unit: str, interpreter: list[str], name: str) -> list[str]:
    """``systemd-run`` starting ``name_floor.py`` as *unit* (a plain service, collected when it
    ends) with *interpreter*, owning *name* on the system bus."""
    script = str(Path(name_floor.__file__).resolve())
    return [
        "systemd-run", "--quiet", "--collect", f"--unit={unit}", "--service-type=exec",
        *interpreter, script, "system", name, str(library_dir()),
    ]  # fmt: skip


def _show(service: str, prop: str) -> str:
    """One property of *service* (``inactive``/``0`` values for a unit that is gone)."""
    return subprocess.run(
        ["systemctl", "show", "-P", prop, service],
        capture_output=True,
        text=True,
        check=True,
        timeout=SYSTEMCTL_TIMEOUT,
    ).stdout.strip()


def _journal(service: str, lines: int = 30) -> str:
    """The last lines *service* and systemd logged about it."""
    return subprocess.run(
        ["journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", service],
        capture_output=True,
        text=True,
        check=False,
        timeout=SYSTEMCTL_TIMEOUT,
    ).stdout.strip()


def stop(service: str) -> None:
    """Stop *service*; one that has ended and been collected is already stopped.

    Raises:
        RuntimeError: systemctl could not stop it.
    """
    done = subprocess.run(
        ["systemctl", "stop", service],
        capture_output=True,
        text=True,
        check=False,
        timeout=SYSTEMCTL_TIMEOUT,
    )
    if done.returncode not in (0, NOT_LOADED):
        raise RuntimeError(
            f"systemctl stop {service} failed (status {done.returncode}): {done.stderr.strip()}"
        )


async def _ended(service: str, launched: asyncio.Future[None]) -> str:
    """Once systemd-run has returned: the state *service* is in when it stops running."""
    await launched
    while True:
        state = await asyncio.to_thread(_show, service, "ActiveState")
        if state not in RUNNING_STATES:
            return state
        await asyncio.sleep(POLL_S)


async def _owner_pid(bus: MessageBus, name: str) -> int:
    """The process id of *name*'s owner, from the bus daemon.

    Raises:
        RuntimeError: the bus daemon did not say.
    """
    reply = await bus.call(
        Message(
            destination=BUS_DAEMON,
            path="/org/freedesktop/DBus",
            interface=BUS_DAEMON,
            member="GetConnectionUnixProcessID",
            signature="s",
            body=[name],
        )
    )
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        raise RuntimeError(f"no process id for the owner of {name}: {reply and reply.body}")
    return int(reply.body[0])


async def seconds_to_floor(name: str, unit: str, interpreter: list[str], limit: float) -> float:
    """Start the floor as *unit* and return the seconds until it owns *name* on the system bus.

    Raises:
        RuntimeError: the floor ended before owning *name*, somebody else owned it, or the
            floor's unit could not be stopped.
        TimeoutError: nobody owned *name* within *limit* seconds.
        subprocess.SubprocessError: systemd-run failed.
    """
    service = f"{unit}.service"
    command = floor_command(unit, interpreter, name)
    loop = asyncio.get_running_loop()
    launched: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if launched.done():
            return
        if error is None:
            launched.set_result(None)
        else:
            launched.set_exception(error)

    def start() -> None:
        try:
            subprocess.run(command, check=True, timeout=SYSTEMCTL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as err:
            loop.call_soon_threadsafe(settle, err)
            raise
        loop.call_soon_threadsafe(settle, None)

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    timed = asyncio.ensure_future(seconds_to_name(bus, name, start, limit))
    ended = asyncio.ensure_future(_ended(service, launched))
    try:
        await asyncio.wait({timed, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not timed.done():
            state = ended.result()  # raises systemd-run's error
            raise RuntimeError(
                f"the floor {service} ended ({state}) before owning {name}:\n{_journal(service)}"
            )
        seconds = timed.result()
        owner = await _owner_pid(bus, name)
        main_pid = int(await asyncio.to_thread(_show, service, "MainPID"))
        if owner != main_pid:
            raise RuntimeError(f"{name} was owned by process {owner}, not the floor ({main_pid})")
        return seconds
    finally:
        launched.cancel()
        for task in (timed, ended):
            task.cancel()
        await asyncio.gather(timed, ended, return_exceptions=True)
        bus.disconnect()
        await asyncio.to_thread(stop, service)
