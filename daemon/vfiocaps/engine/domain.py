"""A device's place in a domain, decided here: its migration fingerprint, which devices a source's
fingerprint is checked against, and its domain XML parts with the host's render node."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from .. import fingerprint as fingerprints
from ..capabilities import Capabilities
from ..domainxml import DomainParts, Viewer, domain_parts, find_render_node
from ..errors import ProbeBusyError, ProbeError
from ..model import DriverIdentity
from .views import DeviceView, ProbeState

# A check's answer: the verdict and its reasons as (field, verdict, detail).
MigrationCheck = tuple[str, list[tuple[str, str, str]]]


def probed(view: DeviceView) -> tuple[Capabilities, DriverIdentity]:
    """The capabilities of a device that has been probed, and its driver.

    Raises:
        ProbeBusyError: the device is busy and nothing is known of its type yet.
        ProbeError: the device has not been probed successfully.
    """
    answer = view.answer
    if answer is None:
        device_id = view.device.device_id
        if view.state is ProbeState.BUSY:
            raise ProbeBusyError(f"{device_id} is in use and its type is not known")
        reason = view.last_error or f"probe state is {view.state.value}"
        raise ProbeError(f"no capabilities for {device_id}: {reason}")
    return answer.capabilities, answer.driver


class DomainAnswers:
    """Answers about devices for a domain, from the engine's views (*views*), the host's
    device nodes under *dev_root* and whether the host is *emulated*."""

    def __init__(
        self, views: Callable[[], Iterable[DeviceView]], dev_root: Path, *, emulated: bool
    ) -> None:
        self._views = views
        self._dev_root = dev_root
        self._emulated = emulated

    def fingerprint(self, view: DeviceView) -> fingerprints.Fingerprint:
        """The migration fingerprint of a probed device.

        Raises:
            ProbeBusyError, ProbeError: see :func:`probed`.
        """
        caps, driver = probed(view)
        return fingerprints.for_device(
            view.device, driver, caps, view.parent_pci_id, emulated=self._emulated
        )

    def candidates(self, source: fingerprints.Fingerprint) -> list[DeviceView]:
        """The probed devices here of the source's driver and type: where it could go."""
        return [
            view
            for view in self._views()
            if (answer := view.answer) is not None
            and answer.driver.module == source.driver
            and view.device.type_id == source.type_id
        ]

    def check(
        self, source: fingerprints.Fingerprint, views: list[DeviceView] | None = None
    ) -> MigrationCheck:
        """Whether a device of fingerprint *source* can migrate to one of *views* (by default
        :meth:`candidates`): the best verdict, the destination it holds for, and its reasons.

        Raises:
            ProbeBusyError, ProbeError: a device named in *views* has not been probed.
        """
        chosen_views = self.candidates(source) if views is None else views
        checked = [
            (view.device.device_id, fingerprints.check(source, self.fingerprint(view)))
            for view in chosen_views
        ]
        found = fingerprints.best([verdict for _, verdict in checked])
        if found is None:
            detail = (
                f"no probed device of type {source.type_id} ({source.driver}) here; "
                "create an instance or name a device"
            )
            return fingerprints.UNKNOWN, [("destination", fingerprints.UNKNOWN, detail)]
        chosen = next(device for device, verdict in checked if verdict is found)
        reasons = [("destination", found.verdict, chosen)]
        reasons += [(reason.field, reason.verdict, reason.detail) for reason in found.reasons]
        return found.verdict, reasons

    def parts(self, view: DeviceView, viewer: Viewer) -> DomainParts:
        """The libvirt domain parts of a probed device for *viewer*, with the render node
        found under the device root now (a GPU may have appeared since the last call).

        Raises:
            ProbeBusyError, ProbeError: see :func:`probed`.
        """
        return domain_parts(view.device, probed(view)[0], viewer, find_render_node(self._dev_root))
