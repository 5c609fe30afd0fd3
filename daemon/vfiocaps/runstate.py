"""The daemon's run-state: one enum, the one object that changes it, and the guards reading it.

A daemon goes ``starting -> learning -> serving -> stopping -> stopped``; it may stop from any
state before ``stopping``. While *learning* it reads the host with its objects exported but
unannounced and no name owned; *serving* begins once the well-known name is owned, and only
then do probes change the host and the bus announce objects; while *stopping* the name is given
back before the objects go. Everything else reads the state from a :class:`Lifecycle` and none
keeps a flag of its own.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

from .errors import NotReadyError, RunStateError, ShuttingDownError

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    """Where the daemon is in its life; the values are the Manager's ``RunState`` property."""

    STARTING = "starting"
    LEARNING = "learning"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


# The changes the life cycle allows, from each state.
NEXT: dict[RunState, frozenset[RunState]] = {
    RunState.STARTING: frozenset({RunState.LEARNING, RunState.STOPPING}),
    RunState.LEARNING: frozenset({RunState.SERVING, RunState.STOPPING}),
    RunState.SERVING: frozenset({RunState.STOPPING}),
    RunState.STOPPING: frozenset({RunState.STOPPED}),
    RunState.STOPPED: frozenset(),
}

RunStateWatcher = Callable[[RunState], None]


class Lifecycle:
    """Owns the run-state: :meth:`_move` is the one place that changes it.

    Watchers are told each new state, synchronously and in the order they came; a watcher that
    raises is logged and skipped, so that a broken output cannot stop a stop.
    """

    def __init__(self) -> None:
        self._state = RunState.STARTING
        self._watchers: list[RunStateWatcher] = []
        self._serving = asyncio.Event()  # set exactly while the state is SERVING

    @property
    def state(self) -> RunState:
        """The current run-state."""
        return self._state

    @property
    def serving(self) -> bool:
        """Whether the daemon is serving: it owns its name, announces and probes."""
        return self._state is RunState.SERVING

    def watch(self, watcher: RunStateWatcher) -> None:
        """Be told every change from now on."""
        self._watchers.append(watcher)

    def unwatch(self, watcher: RunStateWatcher) -> None:
        """Stop being told. Idempotent."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    # ---- the transitions ------------------------------------------------------------------

    def begin_learning(self) -> None:
        """``starting -> learning``: the host is being read.

        Raises:
            RunStateError: the daemon is not starting.
        """
        self._move(RunState.LEARNING)

    def begin_serving(self) -> None:
        """``learning -> serving``: the host is learned and the name is owned.

        Raises:
            RunStateError: the daemon is not learning.
        """
        self._move(RunState.SERVING)

    def begin_stopping(self) -> None:
        """``starting | learning | serving -> stopping``.

        Raises:
            RunStateError: the daemon is stopping or stopped already.
        """
        self._move(RunState.STOPPING)

    def end(self) -> None:
        """``stopping -> stopped``: everything is given back.

        Raises:
            RunStateError: the daemon is not stopping.
        """
        self._move(RunState.STOPPED)

    def _move(self, new: RunState) -> None:
        old = self._state
        if new not in NEXT[old]:
            raise RunStateError(f"the daemon cannot go from {old.value} to {new.value}")
        self._state = new
        if new is RunState.SERVING:
            self._serving.set()
        else:
            self._serving.clear()
        log.debug("run-state %s -> %s", old.value, new.value)
        for watcher in list(self._watchers):
            try:
                watcher(new)
            except Exception:  # a watcher's bug must not keep the daemon in a state
                log.exception("a run-state watcher failed on %s", new.value)

    # ---- readers --------------------------------------------------------------------------

    async def wait_serving(self) -> None:
        """Return once the daemon serves. A daemon that stops before serving never does: the
        wait then lasts until the waiter is cancelled (as the daemon's tasks are when it stops).
        """
        await self._serving.wait()

    def require_serving(self, what: str) -> None:
        """Let a call that needs a learned host through, or say why it cannot be answered now.

        Raises:
            NotReadyError: the daemon is starting or learning the host.
            ShuttingDownError: the daemon is stopping (or stopped).
        """
        state = self._state
        if state is RunState.SERVING:
            return
        if state in (RunState.STARTING, RunState.LEARNING):
            raise NotReadyError(
                f"vfiocapsd is {state.value}: it answers {what} once it has learned the host "
                "(RunState 'serving'); call again in a moment"
            )
        raise ShuttingDownError(
            f"vfiocapsd is {state.value}: {what} is not answered any more; call again once "
            "the service has started anew"
        )
