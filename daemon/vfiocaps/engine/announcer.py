"""Telling listeners: device changes as they happen, status once per batch of changes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from .views import DeviceView, EngineListener, EngineStatus

log = logging.getLogger(__name__)


class Announcer:
    """Holds the listeners and calls them; a listener that raises is logged and skipped.

    Status is read from *status* only when it is told, and within :meth:`batch` only once, at
    the end: a burst of discovery events makes one status update, not thousands.
    """

    def __init__(self, status: Callable[[], EngineStatus]) -> None:
        self._status = status
        self._listeners: list[EngineListener] = []
        self._deferred = False
        self._pending = False

    def subscribe(self, listener: EngineListener) -> None:
        """Receive every change from now on."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: EngineListener) -> None:
        """Stop receiving changes. Idempotent."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _tell(self, call: Callable[[EngineListener], None]) -> None:
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception:  # a listener bug must not stop the engine
                log.exception("an engine listener failed")

    def added(self, view: DeviceView) -> None:
        """A device appeared."""
        self._tell(lambda listener: listener.device_added(view))

    def changed(self, view: DeviceView) -> None:
        """A device's facts, state or record changed."""
        self._tell(lambda listener: listener.device_changed(view))

    def removed(self, device_id: str) -> None:
        """A device went away."""
        self._tell(lambda listener: listener.device_removed(device_id))

    def invalidated(self, driver: str, old: str, new: str, count: int) -> None:
        """Records of *driver* (or ``kernel``, ``qemu``) were dropped."""
        self._tell(lambda listener: listener.cache_invalidated(driver, old, new, count))

    def status_changed(self) -> None:
        """The daemon-wide status changed (told now, or at the end of the batch)."""
        if self._deferred:
            self._pending = True
            return
        status = self._status()
        self._tell(lambda listener: listener.status_changed(status))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Within this block, status changes are told once at the end."""
        if self._deferred:
            yield
            return
        self._deferred, self._pending = True, False
        try:
            yield
        finally:
            self._deferred = False
            if self._pending:
                self.status_changed()
