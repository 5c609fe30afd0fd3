"""Seeing vGPU profiles set or cleared by other tools: the driver sends no uevent for them, so
each virtual function's profile files are compared with what discovery knows."""

from __future__ import annotations

import logging

from ..model import HostSnapshot
from .functions import CREATABLE_PROFILES, CURRENT_PROFILE, NO_PROFILE, PROFILE_DIR
from .scan import PCI_DEVICES
from .sysfs import SysfsTree

log = logging.getLogger("vfiocaps.discovery")


class ProfileWatch:
    """One pass reads two small attributes per known virtual function and nothing else:
    ``nvidia/current_vgpu_type`` (a few bytes), compared with the devices discovery knows, and
    ``nvidia/creatable_vgpu_types`` (a few hundred), compared with the previous pass (it changes
    when a sibling takes a profile or a GPU instance is made). The directories are resolved
    once and remembered until a read fails (the VF went or moved)."""

    def __init__(self, sysfs: SysfsTree) -> None:
        self._sysfs = sysfs
        self._directories: dict[str, str] = {}
        # What each VF was last reported with, so that one that cannot become a device (its
        # profile is unreadable or unusable) is reported once, not at every pass.
        self._reported: dict[str, str] = {}
        self._creatable: dict[str, str | None] = {}
        self.passes = 0

    def _directory(self, function: str) -> str | None:
        directory = self._directories.get(function)
        if directory is None:
            sysfs = self._sysfs
            real = sysfs.resolve(sysfs.path(f"{PCI_DEVICES}/{function}/{PROFILE_DIR}"))
            if real is None:
                return None
            directory = self._directories[function] = str(real)
        return directory

    def current(self, function: str) -> str | None:
        """The profile set on *function* now (``0``: none); ``None`` when unreadable."""
        directory = self._directory(function)
        if directory is None:
            return None
        value = self._sysfs.read_attribute(directory, CURRENT_PROFILE, 64)
        if value is None:
            self._directories.pop(function, None)
            return None
        if not (value.isascii() and value.isdigit() and len(value) <= 9):
            return None
        return str(int(value))

    def _creatable_changed(self, function: str) -> bool:
        """Whether the VF's list of creatable profiles differs from the previous pass's (the
        first pass takes it as it is: discovery has just read it)."""
        directory = self._directory(function)
        text = None
        if directory is not None:
            text = self._sysfs.read_attribute(directory, CREATABLE_PROFILES)
        if function not in self._creatable:
            self._creatable[function] = text
            return False
        previous, self._creatable[function] = self._creatable[function], text
        return text != previous

    def changed(self, snapshot: HostSnapshot) -> list[str]:
        """The virtual functions to read again: each whose profile is not what *snapshot* says
        (a device of that profile while one is set, no device while none is), and, for a card
        whose lists changed without that, one of its VFs (reading a VF again reads its whole
        card's profiles: one per card, not one per sibling)."""
        self.passes += 1
        for gone in set(self._directories) - set(snapshot.functions):
            del self._directories[gone]
        for gone in set(self._reported) - set(snapshot.functions):
            del self._reported[gone]
        for gone in set(self._creatable) - set(snapshot.functions):
            del self._creatable[gone]
        found: list[str] = []
        cards: set[str] = set()
        listed: dict[str, str] = {}  # card -> a VF whose list changed
        for function in sorted(snapshot.functions):
            card = snapshot.functions[function]
            if self._creatable_changed(function):
                listed.setdefault(card, function)
            if self._profile_changed(function, snapshot):
                found.append(function)
                cards.add(card)
        found += [function for card, function in listed.items() if card not in cards]
        return sorted(found)

    def _profile_changed(self, function: str, snapshot: HostSnapshot) -> bool:
        device = snapshot.devices.get(function)
        known = device.type_id if device is not None else NO_PROFILE
        now = self.current(function)
        if now is None:
            now = "unreadable"
        if now == known:
            self._reported.pop(function, None)
            return False
        if self._reported.get(function) == now:
            return False  # told already: it cannot become what it says (logged once)
        self._reported[function] = now
        log.info(
            "discovery: profile of %s is %s now (known: %s); set by another tool",
            function,
            now,
            known,
        )
        return True
