"""The ``org.vfiocaps1.Manager`` interface on ``/org/vfiocaps``."""

# dbus-fast reads the annotations at class creation: keep them real objects, not strings.
from dbus_fast.annotations import DBusStr
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property

from .. import __version__
from .names import MANAGER_INTERFACE


class ManagerInterface(ServiceInterface):
    """Daemon-wide facts and queries."""

    def __init__(self) -> None:
        super().__init__(MANAGER_INTERFACE)

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        """The daemon's version."""
        return __version__
