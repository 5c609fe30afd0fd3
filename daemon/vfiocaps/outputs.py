"""The daemon's outputs besides the bus (NFD labels, the service manager): built in one place.

An output follows the engine from the moment the daemon serves (a learned host: never an empty
label file or a READY=1 before the name is owned) and takes back what it published when the
daemon stops. A new output is a class with the :class:`Output` methods and one line in
:func:`build_outputs`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Protocol

from . import fingerprint
from .config import Config
from .engine import Engine, EngineListener, TypeView
from .nfdfile import FeatureFile
from .nfdlabels import LabelsRecord, NfdLabelWriter, remove_stale_labels
from .notify import Notifier, NotifyError, ServiceStatus, watchdog_interval
from .runstate import RunState

log = logging.getLogger(__name__)


class Output(EngineListener, Protocol):
    """Something the daemon tells the world about, besides the bus."""

    def start(self) -> None:
        """The daemon serves: publish what the engine knows now, and follow it."""
        ...

    async def close(self) -> None:
        """The daemon stops: take back what was published. Called also without a start;
        raises nothing."""
        ...


class Outputs:
    """Every configured output: started when serving begins (a run-state watcher), subscribed
    to the engine while it serves, closed in order by :meth:`close`."""

    def __init__(self, engine: Engine, outputs: list[Output]) -> None:
        self._engine = engine
        self._outputs = outputs

    def run_state_changed(self, state: RunState) -> None:
        """Start every output when the daemon begins to serve."""
        if state is not RunState.SERVING:
            return
        status = self._engine.status
        for output in self._outputs:
            self._engine.subscribe(output)
            output.start()
            output.status_changed(status)

    async def close(self) -> None:
        """Stop following the engine and close each output. Raises nothing."""
        for output in self._outputs:
            self._engine.unsubscribe(output)
            await output.close()


def build_outputs(
    config: Config, engine: Engine, ready: str, environ: Mapping[str, str] = os.environ
) -> Outputs:
    """The outputs *config* and the service manager's *environ* ask for; *ready* is the status
    line of ``READY=1``. The service manager's comes first: it hears ``STOPPING=1`` first."""
    found: list[Output] = []
    notifier = _notifier(environ)
    if notifier is not None:
        found.append(ServiceStatus(notifier, ready, watchdog_interval(config.watchdog_usec)))
    labels = label_writer(config, engine)
    if labels is not None:
        found.append(labels)
    return Outputs(engine, found)


def _notifier(environ: Mapping[str, str]) -> Notifier | None:
    try:
        return Notifier.from_environment(environ)
    except NotifyError as err:
        log.warning("not notifying the service manager: %s", err)
        return None


def label_writer(config: Config, engine: Engine) -> NfdLabelWriter | None:
    """The NFD label writer the configuration asks for, or None (then a feature file an
    earlier run left is removed)."""
    record = LabelsRecord(config.cache_dir / "nfd-labels-directory")
    if config.nfd_features_dir is None:
        remove_stale_labels(record, None)
        return None
    return NfdLabelWriter(
        FeatureFile(config.nfd_features_dir),
        engine.types,
        fingerprint_of=_fingerprint_of,
        emulated=config.emulated,
        record=record,
    )


def _fingerprint_of(view: TypeView) -> str:
    """A probed type's migration fingerprint (JSON), as the NFD labels hash it."""
    answer = view.answer
    if answer is None:
        return ""
    return fingerprint.for_type(
        answer.driver, view.type_id, view.device_api, answer.capabilities, view.parent_pci_id
    ).to_json()
