"""Errors of the discovery layer, all below :class:`vfiocaps.errors.DiscoveryError`."""

from __future__ import annotations

from ..errors import DiscoveryError


class UdevUnavailableError(DiscoveryError):
    """libudev cannot be loaded or its netlink monitor cannot be opened."""


class DiscoveryStateError(DiscoveryError):
    """A discovery method was called in a state that does not allow it (e.g. start twice)."""
