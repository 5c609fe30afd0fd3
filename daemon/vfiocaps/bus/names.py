"""Well-known names of the vfiocaps D-Bus contract: bus name, object paths, interfaces."""

from __future__ import annotations

BUS_NAME = "org.vfiocaps"
ROOT_PATH = "/org/vfiocaps"
DEVICES_PATH = "/org/vfiocaps/devices"
MANAGER_INTERFACE = "org.vfiocaps1.Manager"
DEVICE_INTERFACE = "org.vfiocaps1.Device"
OBJECT_MANAGER_INTERFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_INTERFACE = "org.freedesktop.DBus.Introspectable"
PEER_INTERFACE = "org.freedesktop.DBus.Peer"
