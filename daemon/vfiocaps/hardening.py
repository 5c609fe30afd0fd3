"""Process-wide restrictions the daemon puts on itself at start, whoever started it."""

from __future__ import annotations

import ctypes
import logging
import os

from .errors import HardeningError

log = logging.getLogger("vfiocaps")

# From <linux/prctl.h>.
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


def forbid_new_privileges() -> None:
    """Set ``no_new_privs`` on this process and so on everything it starts (the probe QEMU).

    Under the unit ``NoNewPrivileges=yes`` already does this; started any other way (by hand,
    by a test, in a VM) the daemon would otherwise start QEMU able to gain privileges through a
    set-user-ID or file-capability binary. Changing to the probe user before ``exec`` remains
    allowed: the flag only stops ``execve`` from granting more.

    Raises:
        HardeningError: the kernel refused (it is irreversible and cannot otherwise fail).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise HardeningError(f"cannot set no_new_privs: {os.strerror(err)}")
    if prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise HardeningError("no_new_privs did not stick")
    log.debug("no_new_privs set")
