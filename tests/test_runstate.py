"""The daemon's run-state without any I/O: transitions, illegal ones, watchers, waits, guards."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from vfiocaps.bus.errors import to_dbus_error
from vfiocaps.ctl.exits import ERROR_EXIT_CODES, EXIT_UNAVAILABLE, exit_status_of
from vfiocaps.errors import NotReadyError, NotServingError, RunStateError, ShuttingDownError
from vfiocaps.runstate import NEXT, Lifecycle, RunState

S = RunState


def at(state: RunState) -> Lifecycle:
    """A lifecycle brought to *state* by the shortest legal path."""
    lifecycle = Lifecycle()
    path = {
        S.STARTING: [],
        S.LEARNING: [lifecycle.begin_learning],
        S.SERVING: [lifecycle.begin_learning, lifecycle.begin_serving],
        S.STOPPING: [lifecycle.begin_learning, lifecycle.begin_serving, lifecycle.begin_stopping],
        S.STOPPED: [
            lifecycle.begin_learning,
            lifecycle.begin_serving,
            lifecycle.begin_stopping,
            lifecycle.end,
        ],
    }[state]
    for step in path:
        step()
    assert lifecycle.state is state
    return lifecycle


def move(lifecycle: Lifecycle, to: RunState) -> None:
    {
        S.LEARNING: lifecycle.begin_learning,
        S.SERVING: lifecycle.begin_serving,
        S.STOPPING: lifecycle.begin_stopping,
        S.STOPPED: lifecycle.end,
    }[to]()


def test_a_daemon_starts_in_starting_and_the_values_are_the_property_values() -> None:
    assert Lifecycle().state is S.STARTING
    assert [s.value for s in S] == ["starting", "learning", "serving", "stopping", "stopped"]


def test_the_whole_life_in_order_tells_each_state_once() -> None:
    lifecycle = Lifecycle()
    seen: list[RunState] = []
    lifecycle.watch(seen.append)
    lifecycle.begin_learning()
    lifecycle.begin_serving()
    lifecycle.begin_stopping()
    lifecycle.end()
    assert seen == [S.LEARNING, S.SERVING, S.STOPPING, S.STOPPED]


@pytest.mark.parametrize("early", [S.STARTING, S.LEARNING])
def test_a_daemon_may_stop_before_it_serves(early: RunState) -> None:
    lifecycle = at(early)
    lifecycle.begin_stopping()
    lifecycle.end()
    assert lifecycle.state is S.STOPPED


# Every change no transition allows (nothing moves to starting: see the test after it).
ILLEGAL = [
    (old, new)
    for old, new in itertools.product(S, S)
    if new is not S.STARTING and new not in NEXT[old]
]


@pytest.mark.parametrize(("old", "new"), ILLEGAL)
def test_every_other_change_raises_and_changes_nothing(old: RunState, new: RunState) -> None:
    lifecycle = at(old)
    told: list[RunState] = []
    lifecycle.watch(told.append)
    with pytest.raises(RunStateError, match=f"from {old.value} to {new.value}"):
        move(lifecycle, new)
    assert lifecycle.state is old
    assert told == []


def test_nothing_leads_back_to_starting_and_stopped_is_final() -> None:
    assert all(S.STARTING not in targets for targets in NEXT.values())
    assert NEXT[S.STOPPED] == frozenset()


def test_a_failing_watcher_is_skipped_and_the_others_are_told() -> None:
    lifecycle = Lifecycle()
    told: list[RunState] = []

    def broken(state: RunState) -> None:
        raise ValueError("a bug in an output")

    lifecycle.watch(broken)
    lifecycle.watch(told.append)
    lifecycle.begin_learning()
    assert lifecycle.state is S.LEARNING
    assert told == [S.LEARNING]


def test_an_unwatched_watcher_hears_nothing_more() -> None:
    lifecycle = Lifecycle()
    told: list[RunState] = []
    lifecycle.watch(told.append)
    lifecycle.begin_learning()
    lifecycle.unwatch(told.append)
    lifecycle.unwatch(told.append)  # idempotent
    lifecycle.begin_serving()
    assert told == [S.LEARNING]


def test_serving_is_true_only_while_serving() -> None:
    assert [at(state).serving for state in S] == [False, False, True, False, False]


async def test_probes_wait_for_serving_and_not_for_a_daemon_that_stops_first() -> None:
    lifecycle = at(S.LEARNING)
    waiter = asyncio.ensure_future(lifecycle.wait_serving())
    await asyncio.sleep(0)
    assert not waiter.done()
    lifecycle.begin_serving()
    async with asyncio.timeout(1):
        await waiter

    stopped_early = at(S.LEARNING)
    waiter = asyncio.ensure_future(stopped_early.wait_serving())
    stopped_early.begin_stopping()
    await asyncio.sleep(0.01)
    assert not waiter.done()  # a probe that never may run waits until it is cancelled
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


@pytest.mark.parametrize("state", [S.STARTING, S.LEARNING])
def test_the_guard_says_not_ready_while_the_host_is_learned(state: RunState) -> None:
    with pytest.raises(NotReadyError, match=f"vfiocapsd is {state.value}: it answers ListDevices"):
        at(state).require_serving("ListDevices")


@pytest.mark.parametrize("state", [S.STOPPING, S.STOPPED])
def test_the_guard_says_shutting_down_once_stopping(state: RunState) -> None:
    with pytest.raises(ShuttingDownError, match="call again once the service has started"):
        at(state).require_serving("GetCapabilities")


def test_the_guard_lets_calls_through_while_serving() -> None:
    at(S.SERVING).require_serving("ListDevices")


def test_the_refusals_have_d_bus_names_and_exit_statuses() -> None:
    ready, down = NotReadyError("learning"), ShuttingDownError("stopping")
    assert to_dbus_error(ready, "ListDevices").type == "org.vfiocaps1.Error.NotReady"
    assert to_dbus_error(down, "ListDevices").type == "org.vfiocaps1.Error.ShuttingDown"
    assert ERROR_EXIT_CODES["org.vfiocaps1.Error.NotReady"] == EXIT_UNAVAILABLE
    assert ERROR_EXIT_CODES["org.vfiocaps1.Error.ShuttingDown"] == EXIT_UNAVAILABLE
    assert exit_status_of(ready) == exit_status_of(down) == EXIT_UNAVAILABLE
    assert isinstance(ready, NotServingError)
    assert isinstance(down, NotServingError)
